"""pad_batch: the padded batch every hand-written loop (eval, generate, analyze) builds."""

from __future__ import annotations

import pytest

from rlora_cli.data.packing import IGNORE, pad_batch


def test_pad_batch_right_and_left():
    seqs = [[5, 6, 7], [8]]
    right = pad_batch(seqs, pad_id=0)
    assert set(right) == {"input_ids", "attention_mask"}
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = pad_batch(seqs, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert str(left["input_ids"].dtype) == "torch.int64"


def test_pad_batch_labels_take_the_ignore_value():
    out = pad_batch([[1, 2], [3, 4, 5]], pad_id=9, labels=[[-100, 2], [-100, 4, 5]])
    assert out["input_ids"].tolist() == [[1, 2, 9], [3, 4, 5]]
    assert out["labels"].tolist() == [[-100, 2, IGNORE], [-100, 4, 5]]
    left = pad_batch([[1], [3, 4]], pad_id=9, side="left", labels=[[1], [3, 4]], ignore=-1)
    assert left["labels"].tolist() == [[-1, 1], [3, 4]]


def test_pad_batch_shapes_and_bad_side():
    assert tuple(pad_batch([[1], [2]], pad_id=0)["input_ids"].shape) == (2, 1)
    assert tuple(pad_batch([[], []], pad_id=0)["input_ids"].shape) == (2, 0)
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], pad_id=0, side="middle")
