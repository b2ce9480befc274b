"""Two training processes on the CPU: `accelerate launch` with the gloo backend, checked with numbers.

    HF_HUB_OFFLINE=1 pytest tests/training/test_distributed.py

The multi-process paths of train/ (each process's share of the epoch, the step's loss summed over
processes and divided by the global label-token count, the save_minutes vote riding in the step's
all-reduce, the final adapter save, checkpoints and `--resume auto`) run here as they run on
several GPUs, on two CPU processes. Three runs are shared by every test (module fixture):
- `one`: one process, in this process: micro-batch 4 × accumulation 2 (global batch 8);
- `two`: `accelerate launch` of two processes, micro-batch 2 × accumulation 2 each (global batch
  8; accumulation 2 so DDP's no_sync on the first micro-batch runs too);
- `resumed`: a copy of `two` cut back to its checkpoint-2, as a run killed just after saving it
  leaves its folder, continued by a second launch with `--resume auto`.
Dropout is off: each process draws its own masks, which would hide everything else.

Why not `accelerate launch --cpu --num_processes 2`: `--cpu` takes Accelerate's simple launcher,
which starts one process (two need an MPI hostfile), so the run would train alone. The torchrun
launcher behind `--multi_gpu` starts two, and ACCELERATE_USE_CPU=1 (with no visible CUDA device)
makes each a CPU process of a gloo group (run_info.json says MULTI_CPU, world size 2).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO

from rlora_cli.adapters import adapter_state
from rlora_cli.checkpoint import load_adapter
from rlora_cli.errors import UserError
from rlora_cli.model import load_model
from rlora_cli.testing import adapter_tensors, metrics, write_recipe
from rlora_cli.training.loop import train
from rlora_cli.training.state import EpochSampler, schedule

STEPS, GLOBAL_BATCH = 4, 8
# The step's loss is a sum of float32 token losses over processes (or micro-batches) divided by
# the token count: the two runs add the sums in another order and pad their batches to other
# lengths (other matmul shapes), a relative difference of a few float32 ulps (~1e-7) per step.
# Four AdamW steps carry it into the adapter, at most ~1e-6 absolute for weights of order 0.1;
# 1e-5 bounds both with room. A wrong normalisation (a per-process mean, a missing world factor)
# moves the loss or the gradient norm by percent; a uniform scale error that AdamW's update would
# hide from the adapter still shows in the logged gradient norm.
LOSS_RTOL, ADAPTER_ATOL = 1e-5, 1e-5


def free_port() -> int:
    """A TCP port nothing listens on now: other test runs on this machine may use the default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: str, out: Path, *args: str) -> str:
    """`accelerate launch` of two CPU processes running `rlora train RECIPE`; returns its output."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "rlora_cli", "train", recipe, "--output", str(out), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "COLUMNS": "400"}  # rich wraps lines at 80 columns without a terminal
    # A timeout, not a hang: processes that disagree on a collective (a save only one of them
    # takes) wait for each other forever.
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, learnable_model_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("distributed")
    recipe = write_recipe(folder, learnable_model_dir, adapter={"lora_dropout": 0.0},
                          train={"max_steps": STEPS, "micro_batch_size": 2, "gradient_accumulation_steps": 2},
                          # save_minutes of 6 ms: the main process votes to save after every step
                          output={"save_steps": 2, "save_total_limit": 0, "save_minutes": 1e-4})
    # 9 held-out facts: one process scores 5 rows, the other 4 and then a dummy batch.
    doc = yaml.safe_load(Path(recipe).read_text())
    doc["data"]["datasets"][0]["val_size"] = 9
    Path(recipe).write_text(yaml.safe_dump(doc))

    one = train(recipe, ("train.micro_batch_size=4", "output.save_minutes=0"), output=folder / "one")
    launch(recipe, folder / "two")
    resumed = folder / "resumed"
    shutil.copytree(folder / "two", resumed)
    for gone in ("checkpoint-3", "checkpoint-4", "adapter", "plots"):
        shutil.rmtree(resumed / gone)
    log = launch(recipe, resumed, "--resume", "auto")
    assert f"resuming from {resumed / 'checkpoint-2'} (step 2 of {STEPS})" in log
    return {"one": one, "two": folder / "two", "resumed": resumed}


def step_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(run) if "loss" in r}


def eval_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r["eval_loss"] for r in metrics(run) if "eval_loss" in r}


# ---------------------------------------------------------------------------- the sampler's split


def step_examples(n: int, world: int, micro: int, accumulation: int, epoch: int) -> list[list[set[int]]]:
    """Per optimizer step of `epoch`, the example indices each rank reads (as train_loader batches
    its EpochSampler and the loop takes `accumulation` micro-batches a step)."""
    per_rank = []
    for rank in range(world):
        sampler = EpochSampler(n, seed=0, rank=rank, world=world)
        sampler.epoch = epoch
        order = list(sampler)
        assert len(order) == len(sampler)
        batches = [order[i:i + micro] for i in range(0, len(order), micro)]
        per_rank.append([{i for b in batches[s:s + accumulation] for i in b}
                         for s in range(0, len(batches), accumulation)])
    return [list(step) for step in zip(*per_rank, strict=True)]


@pytest.mark.parametrize("n", [80, 81])
def test_two_ranks_split_each_step_of_the_one_process_run_between_them(n):
    """Rank r reads every other example of the epoch's permutation: at the same global batch the
    two ranks' examples of a step are disjoint and together the one-process step's. With an odd
    count the permutation wraps around, so the last step adds the epoch's first example again."""
    alone_cfg = SimpleNamespace(micro_batch_size=4, gradient_accumulation_steps=2, max_steps=0, num_epochs=1)
    shared_cfg = SimpleNamespace(**{**vars(alone_cfg), "micro_batch_size": 2})
    assert schedule(n, 1, alone_cfg)[1] == schedule(n, 2, shared_cfg)[1] == -(-n // GLOBAL_BATCH)
    for epoch in (0, 1):
        alone, shared = step_examples(n, 1, 4, 2, epoch), step_examples(n, 2, 2, 2, epoch)
        assert len(alone) == len(shared) == -(-n // GLOBAL_BATCH)
        first = step_examples(n, 1, 1, 1, epoch)[0][0]  # {the permutation's first example}
        for k, ((whole,), (a, b)) in enumerate(zip(alone, shared)):
            if n % 2 and k == len(alone) - 1:
                assert a | b == whole | first and len(a) + len(b) == len(whole) + 1
            else:
                assert not a & b and a | b == whole
        assert set().union(*(s for (s,) in alone)) == set(range(n))
    assert step_examples(n, 1, 4, 2, 1) != step_examples(n, 1, 4, 2, 0)  # a new permutation each epoch


# ---------------------------------------------------------------------------- loss normalisation


def test_two_processes_log_the_one_process_losses(runs):
    """Same examples per step (equal label-token counts, an exact integer), the same loss, norm
    and learning rate per step, and the same held-out loss, which each process scores on its
    share of the rows with its own copy of the weights."""
    one, two = step_rows(runs["one"]), step_rows(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        a, b = one[step], two[step]
        assert (b["tokens"], b["epoch"], b["lr"]) == (a["tokens"], a["epoch"], a["lr"])
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=LOSS_RTOL)
        assert b["task_loss"] == pytest.approx(a["task_loss"], rel=LOSS_RTOL)
    assert one[STEPS]["loss"] < one[1]["loss"]  # it trained: the comparison is not of constants
    (e1,), (e2,) = eval_rows(runs["one"]).values(), eval_rows(runs["two"]).values()
    assert set(e1) == {"facts", "reviews"} and e2 == pytest.approx(e1, rel=LOSS_RTOL)
    info = json.loads((runs["two"] / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["distributed"].endswith("MULTI_CPU")


def test_two_processes_train_the_one_process_adapter(runs):
    a, b = adapter_tensors(runs["one"]), adapter_tensors(runs["two"])
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=ADAPTER_ATOL)
    routers = [k for k in a if k.endswith("rlora_router")]
    assert routers and all(b[k].abs().sum() > 0 for k in routers)  # trained: routers start at 0


# ---------------------------------------------------------------------------- the final save


def test_the_final_adapter_is_written_once_and_loads(runs, learnable_model_dir):
    """OUT/adapter is the main process's copy, the same tensors as its last checkpoint's (saved
    from the same weights a moment before), complete (no temporary folder of a second writer)
    and loadable on a fresh base, giving back those tensors."""
    run = runs["two"]
    saved, last = adapter_tensors(run), adapter_tensors(run / f"checkpoint-{STEPS}")
    assert saved.keys() == last.keys() and all(torch.equal(saved[k], last[k]) for k in saved)
    assert not list(run.glob(".adapter*"))
    model, _ = load_model(str(learnable_model_dir), dtype="float32")
    state = adapter_state(load_adapter(model, run / "adapter"))
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def test_save_minutes_votes_reach_every_process(runs):
    """Only the main process's clock votes; the vote rides in the step's all-reduce, so both
    processes save at the same steps (else they would wait on different collectives, and the
    launch would time out). A 6 ms clock votes after every step: checkpoints 1 and 3 are the
    clock's, 2 and 4 save_steps' and the end's."""
    two = runs["two"]
    names = sorted(p.name for p in two.glob("checkpoint-*"))
    assert names == [f"checkpoint-{s}" for s in range(1, STEPS + 1)]
    for s in range(1, STEPS + 1):
        assert json.loads((two / f"checkpoint-{s}" / "trainer_state.json").read_text())["step"] == s


def test_every_process_state_lands_in_its_checkpoint(runs):
    """Every process's RNG state is in each checkpoint (save_checkpoint waits for all of them to
    have written before the folder is renamed into place) and no temp folder is left."""
    two = runs["two"]
    for ckpt in two.glob("checkpoint-*"):
        assert {p.name for p in (ckpt / "state").glob("random_states_*.pkl")} == {
            "random_states_0.pkl", "random_states_1.pkl"}, ckpt.name
    assert not list(two.glob(".checkpoint-*.tmp"))


# ---------------------------------------------------------------------------- resume


def test_resume_auto_on_two_processes_continues_the_run_exactly(runs):
    """Cut back to checkpoint-2, the resumed run logs the uninterrupted run's steps 3 and 4 bit for
    bit (the steps before are kept from the first run, the later rows dropped and rewritten) and
    ends with the same adapter: the optimizer, the schedule and each rank's place in the epoch
    came back."""
    two, resumed = runs["two"], runs["resumed"]
    keep = ("loss", "grad_norm", "lr", "tokens", "epoch", "task_loss")
    rows = lambda run: {s: {k: r[k] for k in keep} for s, r in step_rows(run).items()}  # noqa: E731
    assert rows(resumed) == rows(two)
    assert eval_rows(resumed) == eval_rows(two)
    a, b = adapter_tensors(two), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, 5)]


def test_resume_with_another_process_count_is_refused(runs, tmp_path):
    """Each process counts its own place in the epoch, so a checkpoint of two processes resumed by
    one would skip or repeat rows: refused with one line, and the run folder is left as it was."""
    copy = tmp_path / "two"
    shutil.copytree(runs["two"], copy)
    recipe = runs["two"] / "recipe.yaml"
    with pytest.raises(UserError) as e:
        train(recipe, output=copy, resume="auto")
    assert "was written by 2 process(es), and this run has 1" in e.value.problem
    assert "--num_processes 2" in e.value.fix
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in runs["two"].iterdir())
