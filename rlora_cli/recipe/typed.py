"""Recipe schema checks: YAML values against dataclass field types, and unknown keys.

`build` turns one YAML mapping into a dataclass from its type hints and reports, with YAML paths,
what does not fit: wrong types, numbers no run can use (nan, inf, integers past `INT_MAX`),
missing required keys, unknown keys. Unknown keys get the most
useful hint we can give: other tools' names translated (`cutoff_len` is LLaMA-Factory's name for
`data.max_length`), keys written in the wrong section, then difflib's "did you mean".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Union

from rlora_cli import config
from rlora_cli.adapters.methods import AdapterConfig
from rlora_cli.config.model import QuantizationConfig

# Other tools' names -> (rlora key, the tool that uses the name). Users arrive with configs from
# these tools; naming the rlora key saves them a trip to the docs.
ALIASES: dict[str, tuple[str, str | None]] = {
    "lora_r": ("adapter.r", "axolotl"),  # PEFT says r, as rlora does
    "lora_rank": ("adapter.r", "LLaMA-Factory"),
    "rank": ("adapter.r", None),
    "alpha": ("adapter.lora_alpha", None),
    "lora_target": ("adapter.target_modules", "LLaMA-Factory"),
    "lora_target_modules": ("adapter.target_modules", "axolotl"),
    "lora_nums": ("adapter.num_heads", "HydraLoRA's code"),
    "num_experts": ("adapter.num_heads", None),
    "finetuning_type": ("adapter.type", "LLaMA-Factory"),
    "peft_type": ("adapter.type", "PEFT"),
    "method": ("adapter.type", None),
    "cutoff_len": ("data.max_length", "LLaMA-Factory"),
    "sequence_len": ("data.max_length", "axolotl"),
    "max_seq_length": ("data.max_length", "TRL"),
    "max_seq_len": ("data.max_length", "torchtune"),
    "model_max_length": ("data.max_length", "transformers"),
    "model_name_or_path": ("model.name_or_path", "transformers/LLaMA-Factory"),
    "base_model": ("model.name_or_path", "axolotl"),
    "torch_dtype": ("model.dtype", "transformers"),
    "load_in_4bit": ("model.quantization.bits: 4", "axolotl/transformers"),
    "load_in_8bit": ("model.quantization.bits: 8", "axolotl/transformers"),
    "quantization_bit": ("model.quantization.bits", "LLaMA-Factory"),
    "quantization_type": ("model.quantization.type", "LLaMA-Factory"),
    "double_quantization": ("model.quantization.double_quant", "LLaMA-Factory"),
    "bnb_4bit_quant_type": ("model.quantization.type", "transformers"),
    "bnb_4bit_use_double_quant": ("model.quantization.double_quant", "transformers"),
    "bnb_4bit_compute_dtype": ("model.quantization.compute_dtype", "transformers"),
    "per_device_train_batch_size": ("train.micro_batch_size", "the transformers Trainer"),
    "batch_size": ("train.micro_batch_size", None),
    "num_train_epochs": ("train.num_epochs", "the transformers Trainer"),
    "epochs": ("train.num_epochs", None),
    "lr": ("train.learning_rate", None),
    "lr_scheduler_type": ("train.lr_scheduler", "the transformers Trainer"),
    "bf16": ("train.precision: bf16", "the transformers Trainer"),
    "fp16": ("train.precision: fp16", "the transformers Trainer"),
    "output_dir": ("output.dir", "the transformers Trainer"),
    "report_to": ("output.log_with", "the transformers Trainer"),
    "eval_strategy": ("output.eval_steps", "the transformers Trainer"),
    "save_strategy": ("output.save_steps", "the transformers Trainer"),
    "dataset": ("data.datasets", "LLaMA-Factory"),
    "train_on_inputs": ("data.train_on_prompt", "axolotl"),
    "sample_packing": ("data.packing", "axolotl"),
    "val_set_size": ("data.datasets[].val_size", "axolotl"),
    "interleave_probs": ("data.datasets[].weight", "LLaMA-Factory"),
}
# Every integer key is a count, size or step that reaches numpy and torch as a 32-bit integer
# (index tensors, dataloader lengths); past this a run overflows somewhere deep instead of
# starting. A field narrows or moves the bounds with `metadata={"range": (lo, hi)}`.
INT_MAX = 2**31 - 1
# The same inside one `data.datasets[]` entry, where names mean a source's fields.
DATASET_ALIASES: dict[str, tuple[str, str | None]] = {
    "type": ("kind", "axolotl"),
    "formatting": ("kind", "LLaMA-Factory"),
    "data_files": ("path", "datasets"),
    "file_name": ("path", "LLaMA-Factory"),
    "hf_hub_url": ("path", "LLaMA-Factory"),
    "name_or_path": ("path", None),
    "config": ("subset", None),
    "probability": ("weight", None),
    "sampling_rate": ("weight", None),
    "column_mapping": ("columns", None),
    "labels": ("label_words", None),
}


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def unknown_key_problems(raw: dict[str, Any], known: list[str], where: str) -> list[str]:
    """One problem per key of `raw` that is not in `known`, each with the best hint we have."""
    return [_unknown(str(key), known, where) for key in raw if key not in known]


def _unknown(key: str, known: list[str], where: str) -> str:
    path = join(where, key)
    in_dataset = re.fullmatch(r"data\.datasets\[\d+\]", where) is not None
    alias = (DATASET_ALIASES.get(key) if in_dataset else None) or ALIASES.get(key)
    if alias is not None:
        target, tool = alias
        target = join(where, target) if in_dataset and key in DATASET_ALIASES else target
        if tool:
            return f"{path}: `{key}` is {tool}'s name; rlora calls it `{target}`"
        return f"{path}: unknown key; rlora calls it `{target}`"
    home = _home_of(key)
    if home is not None and home != where:
        return f"{path}: unknown key here; it belongs in `{join(home, key)}`"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"{path}: unknown key; did you mean `{join(where, close[0])}`?"
    return f"{path}: unknown key; the keys here are {', '.join(known)}"


def _home_of(key: str) -> str | None:
    homes = {"": ["seed"], "model": config.ModelConfig, "adapter": AdapterConfig,
             "model.quantization": QuantizationConfig,
             "data": config.DataConfig, "data.datasets[]": config.DatasetConfig,
             "train": config.TrainConfig, "output": config.OutputConfig}
    for home, cls in homes.items():
        names = cls if isinstance(cls, list) else [f.name for f in dataclasses.fields(cls)]
        if key in names:
            return home
    return None


def build(cls: type, raw: Any, where: str, problems: list[str], *,
          given: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, set[str]]:
    """The well-typed values of a YAML mapping for `cls`, and the names of the fields that are
    not; problems (wrong types, unknown keys, missing required keys) go to `problems`. Values is
    None when `cls` cannot be built at all (not a mapping, a required field missing or bad); a
    bad optional field is left out, so its default stands in and the other fields can still be
    range-checked. `given` supplies fields the caller builds itself."""
    if not isinstance(raw, dict):
        problems.append(f"{where or 'the recipe'}: must be a mapping (key: value lines), got {_show(raw)}")
        return None, set()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems += unknown_key_problems(raw, list(fields), where)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(given or {})
    bad: set[str] = set()
    for name, f in fields.items():
        if name in values:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name in raw:
            ok, value = convert(raw[name], hints[name])
            problem = (number_problem(join(where, name), value, f) if ok else
                       f"{join(where, name)}: must be {describe(hints[name])}, got {_show(raw[name])}"
                       + _yaml_bool_hint(raw[name], hints[name]))
            if problem is None:
                values[name] = value
                continue
            bad.add(name)
            problems.append(problem)
        elif required:
            bad.add(name)
            problems.append(f"{join(where, name)}: missing (required)")
    required_bad = any(fields[n].default is dataclasses.MISSING
                       and fields[n].default_factory is dataclasses.MISSING for n in bad)
    return (None if required_bad else values), bad


def number_problem(key: str, value: Any, f: dataclasses.Field) -> str | None:
    """Why a well-typed number cannot be used, or None: nan and inf (unless the field's metadata
    has `"inf": True`, which allows +inf) and integers outside the field's `"range"` (default
    +-INT_MAX). The field's own range checks (> 0, in [0, 1) ...) come after, in its class."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if "range" in f.metadata:
            lo, hi = f.metadata["range"]
            if not lo <= value <= hi:
                return f"{key}: {_show(value)} is out of range; give an integer from {lo} to {hi}"
        elif abs(value) > INT_MAX:
            return (f"{key}: {_show(value)} is too {'large' if value > 0 else 'small'}; integers in a recipe "
                    f"must be within ±{INT_MAX} (2**31-1)")
    if isinstance(value, float) and not math.isfinite(value):
        if value == math.inf and f.metadata.get("inf"):
            return None
        allowed = "a finite number or .inf" if f.metadata.get("inf") else "a finite number"
        return f"{key}: must be {allowed}, got {value}"
    return None


def about(problem: str, where: str, names: set[str]) -> bool:
    """Whether a problem message is about one of the fields `names` of the object at `where`."""
    return any(problem.startswith((f"{join(where, n)}:", f"{join(where, n)}.", f"{join(where, n)}["))
               for n in names)


def convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """(fits, value converted to the hint's type): ints widen to floats, lists become tuples,
    and strings such as '1e-4' (which YAML 1.1 reads as strings) become floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return type(None) in args, None
        for arg in args:  # in declared order: `float | int` keeps 3 an int, 0.5 a float
            if arg is not type(None) and _exact(value, arg):
                return True, value
        for arg in args:
            if arg is not type(None):
                ok, converted = convert(value, arg)
                if ok:
                    return True, converted
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [convert(v, args[0]) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in value.items())
        return ok, dict(value) if ok else value
    return _scalar(value, hint)


def _exact(value: Any, hint: Any) -> bool:
    return isinstance(hint, type) and type(value) is hint


def _scalar(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    return isinstance(value, hint), value


def describe(hint: Any) -> str:
    """'a number', 'a list of strings or a string' ... for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" (or null)" if type(None) in args else "")
    if origin is tuple:
        return f"a list of {describe(args[0]).removeprefix('a ')}s"
    if origin is dict:
        return "a mapping of names to column names"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _yaml_bool_hint(value: Any, hint: Any) -> str:
    """YAML 1.1 reads yes/no/on/off as booleans: the commonest surprise in label lists."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, bool) for v in items) and "string" in describe(hint):
        return " (YAML reads yes/no/on/off/true/false as booleans: quote them, e.g. \"no\")"
    return ""


def _show(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{text[:60]}..." if len(text) > 63 else text
