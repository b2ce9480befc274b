"""The `data:` section: the sources of the mixture and the data kinds.

The data kinds live here because the checks need them; `data/templates.py` renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlora_cli.config.common import choice, validate

# The data kinds (data/templates.py renders each) and the templates a source can use: the kind's
# own, the tokenizer's chat template, or a named chat format (data/chat_templates.py holds each
# one's text; the names live here because the recipe check needs them).
KINDS = ("instruction", "nlu", "knowledge", "chat", "completion", "text")
CHAT_FORMATS = ("llama3", "qwen", "mistral", "gemma", "alpaca")
TEMPLATE_NAMES = ("default", "chat", *CHAT_FORMATS)
# The roles chat templates know; data/rows.py translates other datasets' names into these.
CHAT_ROLES = ("system", "user", "assistant", "tool")
# kind -> (required fields, optional fields), in the kind's own names (a recipe's `columns:` maps
# a source's column names onto these).
KIND_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instruction": (("instruction", "output"), ("input",)),
    "nlu": (("text", "label"), ("text_pair",)),
    "knowledge": (("question", "answer"), ("choices",)),
    "chat": (("messages",), ()),
    "completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}

FORMATS = ("bigbench",)
# A source file's suffix -> the `datasets` builder that reads it.
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def looks_local(path: str) -> bool:
    """A source path that can only mean a local file (hub ids are `name` or `owner/name`)."""
    return (Path(path).suffix in LOCAL_SUFFIXES or path.startswith((".", "/", "~")) or path.count("/") >= 2
            or "\\" in path)


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """One training source; its name is the task id in logs, metrics and evaluation."""

    WHERE = "data.datasets[]"  # the YAML path of its problems (the loader fills in the index)

    name: str = ""
    """Task name ('' = from the path: the subset, the BIG-bench folder or the file name)."""
    path: str
    """Hub dataset id, or a local .jsonl/.json/.csv/.parquet file or folder of them (relative to
    the working directory); with format: bigbench, a BIG-bench task.json or its folder."""
    kind: str = ""
    """instruction | nlu | knowledge | chat | completion (prompt → completion, verbatim) | text (raw
    text, every token trained) ('' only with format: bigbench, which is knowledge)."""
    format: str | None = None
    """None (rows with the kind's fields) | bigbench (a BIG-bench task.json)."""
    subset: str | None = None
    """Hub sources: the configuration name (GLUE's sst2, mnli...)."""
    split: str | None = None
    """Hub sources: the split to read (None = train); slices such as train[:10%] work."""
    weight: float = 1.0
    """Relative share of training examples (before data.temperature); finite and > 0."""
    columns: dict[str, str] = field(default_factory=dict)
    """Kind field -> source column, for columns named differently ({text: sentence})."""
    label_words: tuple[str, ...] | None = None
    """nlu: the word for each label (integer labels index it); None = the labels are words."""
    template: str = "default"
    """default (the kind's template, see templates.py) | chat (the tokenizer's chat template) |
    llama3 | qwen | mistral | gemma | alpaca (that family's chat format, for a tokenizer without
    one; data/chat_templates.py). A text source takes only default."""
    val_size: float | int = 0.05
    """Held-out rows: a fraction in [0, 1) or an integer count; split off before sampling."""
    max_samples: int | None = None
    """At most this many training examples drawn from this source per epoch (None = no cap)."""

    def __post_init__(self) -> None:
        if isinstance(self.label_words, list):
            object.__setattr__(self, "label_words", tuple(self.label_words))
        validate(self)

    def problems(self, where: str) -> list[str]:
        p = []
        if self.format is not None and self.format not in FORMATS:
            p.append(choice(f"{where}.format", self.format, FORMATS))
        if self.format == "bigbench":
            p += [f"{where}.{k}: a BIG-bench task has fixed fields; remove {k}"
                  for k in ("columns", "label_words", "subset", "split") if getattr(self, k)]
            if self.kind not in ("", "knowledge"):
                p.append(f"{where}.kind: BIG-bench tasks become knowledge rows; "
                         "remove kind or set it to knowledge")
        elif self.kind not in KINDS:
            p.append(f"{where}.kind: missing; choose one of {', '.join(KINDS)}" if not self.kind
                     else choice(f"{where}.kind", self.kind, KINDS))
        if not self.weight > 0:
            p.append(f"{where}.weight: must be > 0, got {self.weight:g}")
        if self.template not in TEMPLATE_NAMES:
            p.append(choice(f"{where}.template", self.template, TEMPLATE_NAMES))
        elif self.kind == "text" and self.template != "default":
            p.append(f"{where}.template: a text source is raw text with no prompt or reply to put in "
                     f"{self.template!r} turns; remove template (or use kind: completion or chat)")
        p += self._size_problems(where) + self._field_problems(where)
        return p

    def _size_problems(self, where: str) -> list[str]:
        p, v = [], self.val_size
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            p.append(f"{where}.val_size: a fraction must be in [0, 1), got {v:g} (or give an integer count)")
        if isinstance(v, int) and v < 0:
            p.append(f"{where}.val_size: a count must be >= 0, got {v}")
        if self.max_samples is not None and self.max_samples < 1:
            p.append(f"{where}.max_samples: must be >= 1 (or null for no cap), got {self.max_samples}")
        return p

    def _field_problems(self, where: str) -> list[str]:
        if self.kind not in KIND_FIELDS or self.format:
            return []
        required, optional = KIND_FIELDS[self.kind]
        p = [f"{where}.columns.{k}: {self.kind} has no field {k!r}; its fields are "
             f"{', '.join(required + optional)}" for k in self.columns if k not in required + optional]
        if self.label_words is not None:
            if self.kind != "nlu":
                p.append(f"{where}.label_words: only nlu sources have label words; remove it")
            elif len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
                p.append(f"{where}.label_words: give at least two different words, "
                         f"got {list(self.label_words)}")
        return p


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The training mixture and how examples become token sequences."""

    WHERE = "data"  # the YAML path its problems start with

    max_length: int = 512
    """Tokens per sequence; longer examples lose tokens from the prompt side, never the response
    (a text source's longer texts become several pieces instead: none of their text is lost)."""
    packing: bool = False
    """Pack several examples per row up to max_length (positions restart, no cross-attention)."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: only on responses; text sources train every
    token either way)."""
    temperature: float = 1.0
    """Example shares follow weight^(1/temperature): 1 = weights as given; >1 flattens toward uniform,
    <1 sharpens toward the heaviest source (finite and > 0)."""
    num_samples: int | None = None
    """Training examples per epoch over all sources (None = the sum of every source's usable
    training rows, each capped by its max_samples)."""
    datasets: tuple[DatasetConfig, ...]
    """The sources; each becomes one task."""

    def __post_init__(self) -> None:
        validate(self)

    def problems(self, where: str) -> list[str]:
        p = []
        if self.max_length < 8:
            p.append(f"{where}.max_length: must be >= 8, got {self.max_length}")
        if not self.temperature > 0:
            p.append(f"{where}.temperature: must be > 0, got {self.temperature:g}")
        if self.num_samples is not None and self.num_samples < 1:
            p.append(f"{where}.num_samples: must be >= 1 (or null), got {self.num_samples}")
        if not self.datasets:
            p.append(f"{where}.datasets: empty; list at least one source")
        seen: dict[str, int] = {}
        for i, d in enumerate(self.datasets):
            if d.name in seen:
                p.append(f"{where}.datasets[{i}].name: {d.name!r} is also data.datasets[{seen[d.name]}]'s "
                         "name; task names must be unique (set name:)")
            seen.setdefault(d.name, i)
        return p


