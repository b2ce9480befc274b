"""Loading a recipe: YAML, dotted overrides, adapter presets and file checks, then typed sections.

    recipe = load_recipe("recipes/demo.yaml", ["train.learning_rate=1e-4"])
    recipe = load_recipe({"model": {...}, "data": {...}})     # a dict of the YAML's shape
    recipe = load_recipe(Recipe(...), ["adapter.r=16"])        # a Recipe built in code

Loading reads the YAML (or takes the dict, or the Recipe's dict form), applies dotted
`KEY=VALUE` overrides (values parsed as YAML), starts the adapter from its preset in
`configs/adapters/<type>.yaml`, then reports every problem in one `UserError`, each with its YAML
path. The sections themselves, their defaults and their range checks are in `rlora_cli/config/`;
each section checks itself when built, and `construct` merges what it finds into the one report.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Union

import yaml

import rlora_cli
from rlora_cli.adapters.methods import METHODS, AdapterConfig
from rlora_cli.config import (
    FIX,
    SEED_RANGE,
    DataConfig,
    DatasetConfig,
    ModelConfig,
    OutputConfig,
    Recipe,
    TrainConfig,
    compile_problems,
)
from rlora_cli.config.model import QuantizationConfig
from rlora_cli.data.sources import check_source
from rlora_cli.data.textfiles import not_utf8
from rlora_cli.errors import UserError, collect, first_line
from rlora_cli.recipe.typed import about, build, join, unknown_key_problems

# Bounds no real adapter reaches: public models' Linear layers are at most ~50k wide, and the
# multi-head papers use a handful of heads. A value past them is a typo, and would otherwise
# fail as an allocation error when the adapter is injected.
ADAPTER_CAPS = {"r": 65536, "num_heads": 256}
# Keys that may change between a run and its resume (everything else must match OUT/recipe.yaml).
RESUMABLE = ("train.max_steps", "train.num_epochs", "output.")


# What a recipe may be given as: a YAML file, a dict of the YAML's shape, or a Recipe built in code.
RecipeSource = Union[str, Path, dict, Recipe]
# What a run's adapter records as its recipe when there is no file (rlora_config.json "recipe").
IN_CODE = "<python>"


def load_recipe(source: RecipeSource, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, override, resolve and validate a recipe; one UserError lists every problem.

    `source` is a YAML path, a dict of the YAML's shape or a Recipe built in code. A dict, and a
    Recipe's dict form, go through the YAML's checks with the same one-line errors; so a Recipe
    gets its data files checked, its tasks named and the overrides validated as a file would.
    Without output.dir a file's run goes to runs/<file name>, the others' to runs/<adapter type>."""
    problems: list[str] = []
    raw = apply_overrides(_raw_recipe(source), overrides, problems)
    default_dir = f"runs/{Path(source).stem}" if isinstance(source, (str, Path)) else None
    recipe = _build_recipe(raw, problems, default_dir=default_dir)
    collect(problems, FIX)
    assert recipe is not None
    return recipe


def recipe_label(source: RecipeSource) -> str:
    """How a run names its recipe in the adapter's rlora_config.json: the path, or IN_CODE."""
    return str(source) if isinstance(source, (str, Path)) else IN_CODE


def _raw_recipe(source: Any) -> dict[str, Any]:
    if isinstance(source, (str, Path)):
        return read_yaml(source)
    if isinstance(source, (dict, Recipe)):
        return _from_python(source)
    raise UserError(f"the recipe must be a YAML path, a dict or a Recipe, got {type(source).__name__}",
                    "pass e.g. \"recipes/demo.yaml\", {\"model\": {...}, \"data\": {...}} or "
                    "rlora_cli.Recipe(...)")


def _from_python(value: Any) -> Any:
    """A Python recipe as YAML would read it: sections built in code become dicts, tuples lists,
    paths strings (so RUN/recipe.yaml is the same whichever way the recipe came)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _from_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_from_python(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The recipe file as a mapping; UserError for a missing, malformed or empty file."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))  # a run folder holds its recipe.yaml
        example = f", e.g. {path / inside[0]}" if inside else f" (examples: {_shown(recipes_dir())})"
        raise UserError(f"{path}: is a directory, not a recipe file",
                        "give the recipe YAML file itself" + example)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file",
                        f"give the path of a recipe YAML (examples: {_shown(recipes_dir())})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or first_line(e)
        raise UserError(f"{path}{at}: not valid YAML ({what})",
                        "fix the line shown (indent with spaces; quote values containing ': ')") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty",
                        "give at least model.name_or_path and data.datasets (see recipes/demo.yaml)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got a {type(raw).__name__}",
                        "start with keys such as model:, adapter:, data:, train: (see recipes/demo.yaml)")
    return raw


def _shown(folder: Path) -> str:
    """A shipped folder as a user would type it: relative when under the working directory."""
    try:
        return f"{folder.relative_to(Path.cwd())}/"
    except ValueError:
        return f"{folder}/"


def apply_overrides(raw: dict[str, Any], overrides: tuple[str, ...] | list[str],
                    problems: list[str]) -> dict[str, Any]:
    """A copy of `raw` with each `a.b[0].c=VALUE` set (VALUE parsed as YAML; a list index may also
    be a dataset's name: data.datasets.sst2.weight=2)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = re.findall(r"[^.\[\]]+", key.strip())
        if not sep or not parts:
            problems.append(f"override {item!r}: write KEY=VALUE with a dotted key, "
                            "e.g. train.learning_rate=1e-4")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text  # an unparseable value stays a string; the schema check names the key
        problem = _set_path(raw, parts, value)
        if problem:
            problems.append(f"override {item!r}: {problem}")
    return raw


def _set_path(node: Any, parts: list[str], value: Any) -> str | None:
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part)
            if index is None:
                return f"{'.'.join(parts[:depth]) or 'the list'} has no item {part!r} ({len(node)} items)"
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:  # absent, or `quantization: null` as --print-config writes it
                    node[part] = {}
                node = node[part]
        else:
            return f"{'.'.join(parts[:depth])} is a {type(node).__name__}, not a section"
    return None


def _list_index(items: list, part: str) -> int | None:
    if part.isdigit():
        return int(part) if int(part) < len(items) else None
    names = [(d.get("name") or default_name(str(d.get("path", "")), d.get("subset"))) if isinstance(d, dict)
             else None for d in items]
    return names.index(part) if part in names else None


def _build_recipe(raw: dict[str, Any], problems: list[str], default_dir: str | None) -> Recipe | None:
    before = len(problems)
    problems += unknown_key_problems(raw, ["seed", "model", "adapter", "data", "train", "output"], "")
    for section in ("model", "data"):
        if section not in raw:
            problems.append(f"{section}: missing; " + ("give model: {name_or_path: ...}" if section == "model"
                                                       else "give data: {datasets: [...]}"))
    parts: dict[str, Any] = {"adapter": build_adapter(raw.get("adapter", {}), problems),
                             "data": _build_data(raw["data"], problems) if "data" in raw else None}
    if "model" in raw:
        parts["model"] = _build_model(raw["model"], problems)
    for name, cls in (("train", TrainConfig), ("output", OutputConfig)):
        if name in raw:
            parts[name] = _checked(cls, raw[name], name, problems)
    seed = _checked(_Seed, {"seed": raw.get("seed", 0)}, "", problems)
    train, data = parts.get("train"), parts["data"]
    if train and data:  # checked here too, so a recipe reports it with every other problem
        problems += compile_problems(train, data)
    if len(problems) > before:
        return None
    output = parts.get("output", OutputConfig())
    default_dir = default_dir or f"runs/{parts['adapter'].type}"
    parts["output"] = dataclasses.replace(output, dir=output.dir or default_dir)
    return Recipe(seed=seed.seed, **parts)


@dataclass(frozen=True, kw_only=True)
class _Seed:
    """The recipe's top-level key, typed and range-checked like a section's."""

    seed: int = field(default=0, metadata={"range": SEED_RANGE})


def _checked(cls: type, raw: Any, where: str, problems: list[str], given: dict[str, Any] | None = None,
             resolve: Any = None, skip: set[str] = frozenset()) -> Any:
    """Build `cls` from YAML; None when anything about it is wrong. Fields of the wrong type take
    their defaults for the section's own checks, whose findings about them are dropped."""
    before = len(problems)
    values, bad = build(cls, raw, where, problems, given=given)
    if values is None:
        return None
    obj = construct(cls, resolve(values) if resolve else values, where, problems, bad | skip)
    return obj if len(problems) == before else None


def construct(cls: type, values: dict[str, Any], where: str, problems: list[str],
              ignore: set[str] = frozenset()) -> Any:
    """`cls(**values)`, or None with the problems its `__post_init__` found added to `problems`:
    moved from the class's own path (`cls.WHERE`, e.g. `data.datasets[]`) to `where`, less those
    about the fields `ignore` (already reported as the wrong type)."""
    try:
        return cls(**values)
    except UserError as e:
        home = getattr(cls, "WHERE", where)
        moved = [where + p[len(home):] if p.startswith(home) else p for p in e.problems]
        problems += [p for p in moved if not about(p, where, ignore)]
        return None


def _build_model(raw: Any, problems: list[str]) -> ModelConfig | None:
    """The model section; a `quantization:` mapping in it is built as a section of its own."""
    quantization = raw.get("quantization") if isinstance(raw, dict) else None
    given = ({"quantization": _checked(QuantizationConfig, quantization, "model.quantization", problems)}
             if isinstance(quantization, dict) else None)
    return _checked(ModelConfig, raw, "model", problems, given=given)


def _build_data(raw: Any, problems: list[str]) -> DataConfig | None:
    before = len(problems)
    entries = raw.get("datasets") if isinstance(raw, dict) else None
    if isinstance(raw, dict) and "datasets" in raw and not isinstance(entries, list):
        problems.append("data.datasets: must be a list of sources (- path: ...)")
    entries = entries if isinstance(entries, list) else []
    datasets = [_build_dataset(e, f"data.datasets[{i}]", problems) for i, e in enumerate(entries)]
    built = tuple(d for d in datasets if d is not None)
    body = {k: v for k, v in raw.items() if k != "datasets"} if isinstance(raw, dict) else raw
    # When every entry failed (and was reported), "datasets: empty" would only repeat it.
    data = _checked(DataConfig, body, "data", problems, given={"datasets": built},
                    skip={"datasets"} if entries and not built else set())
    return data if len(problems) == before else None


def _build_dataset(raw: Any, where: str, problems: list[str]) -> DatasetConfig | None:
    before = len(problems)
    d = _checked(DatasetConfig, raw, where, problems, resolve=_resolve_dataset)
    if d is not None:  # the files are only worth reading once the entry itself makes sense
        problems += check_source(d, where)
    return d if len(problems) == before else None


def _resolve_dataset(values: dict[str, Any]) -> dict[str, Any]:
    """The name from the path when none is given; a BIG-bench task is knowledge."""
    return values | {"name": values.get("name") or default_name(values["path"], values.get("subset")),
                     "kind": values.get("kind") or ("knowledge" if values.get("format") else "")}


def default_name(path: str, subset: str | None = None) -> str:
    """A task name from the source: the subset, a BIG-bench folder, or the file/hub name."""
    if subset:
        return str(subset)
    path = Path(path)
    if path.name == "task.json":
        return path.parent.name
    return path.stem if path.suffix in (".jsonl", ".json", ".csv", ".parquet") else path.name


def build_adapter(raw: Any, problems: list[str]) -> AdapterConfig | None:
    """The adapter section over its method's preset (configs/adapters/<type>.yaml)."""
    if not isinstance(raw, dict):
        hint = f" (write adapter: {{type: {raw}}})" if isinstance(raw, str) else ""
        problems.append(f"adapter: must be a mapping{hint}")
        return None
    method = raw.get("type", "rlora")
    preset = adapter_preset(method) if method in METHODS else {}
    merged = {**preset, **raw}
    if merged.get("router") is False:  # YAML reads an unquoted `router: off` as false
        merged["router"] = "off"
    before = len(problems)
    values, bad = build(AdapterConfig, merged, "adapter", problems)
    for key, cap in ADAPTER_CAPS.items():
        if values is not None and isinstance(values.get(key), int) and values[key] > cap:
            problems.append(f"adapter.{key}: {values.pop(key)} is larger than any model needs; "
                            f"give at most {cap}")
            bad.add(key)
    config = construct(AdapterConfig, values, "adapter", problems, bad) if values is not None else None
    return config if len(problems) == before else None


def adapter_preset(method: str) -> dict[str, Any]:
    """The preset of a method, as written in configs/adapters/<method>.yaml."""
    text = (configs_dir() / "adapters" / f"{method}.yaml").read_text()
    return yaml.safe_load(text) or {}


def configs_dir() -> Path:
    """The shipped configs (adapter presets, accelerate configs)."""
    return shipped_dir("configs")


def recipes_dir() -> Path:
    """The shipped example recipes (their data paths are the checkout's: data/demo/...)."""
    return shipped_dir("recipes")


def shipped_dir(name: str) -> Path:
    """A folder shipped with rlora, `configs` or `recipes`: the checkout's when running from
    source, else the installed package data (rlora_cli.configs, rlora_cli.recipes; pyproject)."""
    root = Path(rlora_cli.__file__).parent.parent
    if (root / "pyproject.toml").is_file() and (root / name).is_dir():
        return root / name
    spec = find_spec(f"rlora_cli.{name}")  # a folder of data files: a namespace package
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"rlora's {name}/ folder is missing from this installation",
                        "reinstall rlora (pip install --force-reinstall rlora)")
    return Path(next(iter(spec.submodule_search_locations)))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain YAML-writable data (OUT/recipe.yaml)."""
    return _plain(dataclasses.asdict(recipe))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys (data.datasets[1].weight) whose values differ between two recipe dicts."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, _MISSING) != fb.get(k, _MISSING)
                  and not _added_field(k, fa, fb))


def _added_field(key: str, fa: dict[str, Any], fb: dict[str, Any]) -> bool:
    """Only one side has `key` but both have its section: a field added since the other side was
    written (a run resumed under a newer rlora), not a change; a source only one side lists is."""
    section = key.rsplit(".", 1)[0] + "."
    return (key in fa) != (key in fb) and all(any(k.startswith(section) for k in f) for f in (fa, fb))


def resume_conflicts(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The differing keys that forbid resuming (all but train.max_steps/num_epochs and output.*)."""
    return [k for k in recipe_diff(saved, new) if not any(k == r or (r.endswith(".") and k.startswith(r))
                                                          for r in RESUMABLE)]


_MISSING = object()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, join(prefix, str(k))))
        return out
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}
