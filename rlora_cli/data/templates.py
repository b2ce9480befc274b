"""Prompt templates: how an example of each data kind becomes text, and which part is trained.

Six kinds (`config.KIND_FIELDS` lists their fields):
- `instruction`: instruction, optional input → output (Alpaca's template);
- `nlu`: text, optional text_pair → label word (the prompt names the label set);
- `knowledge`: question → answer, or question + choices → "letter. answer" (BIG-bench rows keep
  BIG-bench's own prompt and answer with the choice text);
- `chat`: messages [{role, content}, ...] through the tokenizer's chat template, every assistant
  turn trained;
- `completion`: prompt → completion, concatenated verbatim (TRL's prompt-completion rows);
- `text`: raw text, every token trained (continued pretraining; pipeline.py cuts long texts into
  max_length pieces).

`render` returns text segments with a trained flag; pipeline.py tokenizes each segment
separately, so the loss-mask boundary is token-exact. With `template: chat` any kind but text goes
through the tokenizer's chat template (user = prompt, assistant = response); a named format
(`template: llama3`, ...; chat_templates.py) goes the same way with that family's template, and
so do chat rows. `TEMPLATES` holds every format string render uses; `template_info` is what the
trainer saves with an adapter so `rlora generate` and the evaluator can rebuild the same prompts
(a named format's text included: `ChatFormat` carries a saved one back in).
"""

from __future__ import annotations

import copy
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError

from rlora_cli.config import CHAT_ROLES, KINDS, TEMPLATE_NAMES
from rlora_cli.data.chat_templates import CHAT_TEMPLATES
from rlora_cli.errors import UserError

LETTERS = string.ascii_uppercase

_ALPACA_HEAD = "Below is an instruction that describes a task"
TEMPLATES: dict[str, dict[str, str]] = {
    "instruction": {
        "prompt": _ALPACA_HEAD + ". Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Response:\n",
        "prompt_with_input": _ALPACA_HEAD + ", paired with an input that provides further context. "
                             "Write a response that appropriately completes the request.\n\n"
                             "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "response": "{output}",
    },
    "nlu": {
        "prompt": "Classify the text. Answer with one of: {label_list}.\n\nText: {text}\nAnswer:",
        "prompt_with_pair": "Classify the pair of texts. Answer with one of: {label_list}.\n\n"
                            "Text 1: {text}\nText 2: {text_pair}\nAnswer:",
        "label_separator": ", ",
        "response": " {label}",
    },
    "knowledge": {
        "prompt": "Question: {question}\nAnswer:",
        "prompt_with_choices": "Question: {question}\n{choice_list}\nAnswer:",
        "choice": "{letter}. {choice}",
        "choice_separator": "\n",
        "response": " {answer}",
        "response_with_choices": " {letter}. {answer}",
        # BIG-bench rows: the question already is BIG-bench's whole prompt (prefixes, choices when
        # the task appends them, output prefix); trailing spaces move to the response so the
        # answer tokenizes as it does in running text (" 05/01/2021", not " " + "05/01/2021").
        "bigbench_prompt": "{question, trailing spaces removed}",
        "bigbench_response": "{trailing spaces of question}{answer}",
    },
    "chat": {"messages": "the tokenizer's chat template; loss on every assistant turn"},
    "completion": {"prompt": "{prompt}", "response": "{completion}"},
    "text": {"text": "{text}, every token trained; a text longer than max_length is cut into "
                     "max_length pieces"},
}


@dataclass(frozen=True)
class ChatFormat:
    """A named chat format as an adapter saved it (`template_info`): rendering uses this text, not
    today's entry in chat_templates.py, so an old adapter keeps its prompts."""

    name: str
    text: str


# A template is a name in TEMPLATE_NAMES, or a named format carried back from a saved adapter.
Template = str | ChatFormat


@dataclass(frozen=True)
class Example:
    """One training or held-out example. `fields` use the kind's names (see `config.KIND_FIELDS`), plus
    what scoring needs: nlu rows carry `label_words`; knowledge rows with choices carry
    `answer_index`; BIG-bench rows carry `format: "bigbench"` (and `targets` when free-form)."""

    task: str
    kind: str
    fields: dict


def render(example: Example, tokenizer: Any = None, template: Template = "default") -> list[tuple[str, bool]]:
    """Text segments with a trained flag: `[(prompt, False), (response, True)]` for the kinds with
    a prompt and a response, `[(text, True)]` for text, and the turns of a chat."""
    name, chat_template = resolve(template, example)
    with _rendering(example, name):
        if example.kind == "chat":
            return chat_segments(_messages(example), tokenizer, chat_template)
        if example.kind == "text":
            return [(example.fields["text"], True)]
        prompt, response = _default_pair(example)
        if name == "default":
            return [(prompt, False), (response, True)]
        return chat_segments([{"role": "user", "content": prompt},
                              {"role": "assistant", "content": response.strip()}], tokenizer, chat_template)


def prompt_and_response(example: Example, tokenizer: Any = None,
                        template: Template = "default") -> tuple[str, str]:
    """(prompt, response) of a one-turn example: the untrained and the trained text."""
    if example.kind in ("chat", "text"):
        what = "have several turns" if example.kind == "chat" else "are one trained text, with no prompt"
        raise UserError(f"{example.kind} examples {what}", "use render() for them")
    (prompt, _), (response, _) = render(example, tokenizer, template)
    return prompt, response


def prompt_text(example: Example, tokenizer: Any = None, template: Template = "default") -> str:
    """The prompt alone, for generation: response fields may be absent (a text example's prompt is
    its text, continued as it is)."""
    name, chat_template = resolve(template, example)
    with _rendering(example, name):
        if example.kind == "chat":
            return _apply(tokenizer, _messages(example), generation_prompt=True, chat_template=chat_template)
        prompt = _prompt(example.kind, example.fields)
        if name != "default":
            return _apply(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True,
                          chat_template=chat_template)
        return prompt


def resolve(template: Template, example: Example | None = None) -> tuple[str, str | None]:
    """(name, Jinja text to render chats with): the text is None for default and chat (the
    tokenizer's own template), the table's entry for a named format, a saved format's own text."""
    if isinstance(template, ChatFormat):
        name, text = template.name, template.text
    elif template in TEMPLATE_NAMES:
        name, text = template, CHAT_TEMPLATES.get(template)
    else:
        raise UserError(f"unknown template {template!r}", f"use one of {', '.join(TEMPLATE_NAMES)}")
    if example is not None and example.kind == "text" and name != "default":
        raise UserError(f"{example.task}: a text example is raw text, with no turns for template {name!r}",
                        "use template: default for text")
    return name, text


@contextmanager
def _rendering(example: Example, name: str) -> Iterator[None]:
    """A chat template that refuses a conversation (Jinja's raise_exception: a role the format
    has no place for, turns out of order) becomes one line naming the task."""
    try:
        yield
    except TemplateError as e:
        raise UserError(f"{example.task}: the {name} chat template cannot render this example: {e}",
                        "fix those turns in the data, or choose another template") from None


def choices(example: Example, tokenizer: Any = None, template: Template = "default") -> list[str] | None:
    """Candidate response strings, scored by log-likelihood after the prompt (exactly as `render`
    writes the response): every label word for nlu, every "letter. answer" for knowledge with
    choices. None for free-form examples."""
    f = example.fields
    if example.kind == "nlu":
        variants = [{**f, "label": word} for word in f["label_words"]]
    elif example.kind == "knowledge" and f.get("choices"):
        variants = [{**f, "answer": c, "answer_index": i} for i, c in enumerate(f["choices"])]
    else:
        return None
    return [prompt_and_response(Example(example.task, example.kind, v), tokenizer, template)[1]
            for v in variants]


def gold_index(example: Example) -> int | None:
    """Index of the right answer in `choices(example)`; None for free-form examples."""
    f = example.fields
    if example.kind == "nlu":
        return list(f["label_words"]).index(f["label"])
    if example.kind == "knowledge" and f.get("choices"):
        return int(f["answer_index"])
    return None


def template_info(kind: str, template: str = "default") -> dict[str, Any]:
    """JSON-serialisable description of how `kind` is rendered, saved with the adapter; a named
    chat format's Jinja text is saved in `chat_template` (`saved_template` reads it back)."""
    if kind not in KINDS or template not in TEMPLATE_NAMES or (kind == "text" and template != "default"):
        raise UserError(f"no template for kind {kind!r} with template {template!r}",
                        f"kinds: {', '.join(KINDS)}; templates: {', '.join(TEMPLATE_NAMES)} "
                        "(text: default only)")
    info: dict[str, Any] = {"kind": kind, "template": template, "format": copy.deepcopy(TEMPLATES[kind]),
                            "eos": "appended after the last trained segment unless it already ends "
                                   "with the tokenizer's EOS token"}
    which = "the tokenizer's chat template" if template == "chat" else f"the {template} chat format"
    if template in CHAT_TEMPLATES:
        info["chat_template"] = CHAT_TEMPLATES[template]
    if template != "default" and kind != "chat":
        info["chat"] = (f"{which} with user = the default prompt and "
                        "assistant = the default response stripped of surrounding whitespace")
    elif template in CHAT_TEMPLATES:
        info["chat"] = f"{which} renders the messages"
    return info


def saved_template(info: dict[str, Any]) -> Template:
    """The template a saved `template_info` names: a named format as the saved text (an adapter
    saved before its format's entry changed, or was removed, keeps its prompts), else the name."""
    name, text = info.get("template") or "default", info.get("chat_template")
    return ChatFormat(name, text) if isinstance(text, str) and name not in ("default", "chat") else name


def _default_pair(example: Example) -> tuple[str, str]:
    f, t = example.fields, TEMPLATES.get(example.kind)
    if t is None:
        raise UserError(f"unknown data kind {example.kind!r}", f"use one of {', '.join(KINDS)}")
    prompt = _prompt(example.kind, f)
    if example.kind == "completion":
        return prompt, f["completion"]
    if example.kind == "instruction":
        return prompt, t["response"].format(output=f["output"])
    if example.kind == "nlu":
        return prompt, t["response"].format(label=f["label"])
    if f.get("format") == "bigbench":
        q = f["question"]
        return prompt, q[len(q.rstrip(" ")):] + f["answer"]
    if f.get("choices"):
        i = int(f["answer_index"])
        return prompt, t["response_with_choices"].format(letter=LETTERS[i], answer=f["choices"][i])
    return prompt, t["response"].format(answer=f["answer"])


def _prompt(kind: str, f: dict) -> str:
    t = TEMPLATES[kind]
    if kind == "completion":  # verbatim: no template around the user's own text
        return f["prompt"]
    if kind == "text":
        return f["text"]
    if kind == "instruction":
        key = "prompt_with_input" if f.get("input") else "prompt"
        return t[key].format(instruction=f["instruction"], input=f.get("input") or "")
    if kind == "nlu":
        labels = t["label_separator"].join(f.get("label_words") or ())
        key = "prompt_with_pair" if f.get("text_pair") else "prompt"
        return t[key].format(label_list=labels, text=f["text"], text_pair=f.get("text_pair") or "")
    if f.get("format") == "bigbench":
        return f["question"].rstrip(" ")
    if f.get("choices"):
        if len(f["choices"]) > len(LETTERS):
            raise UserError(f"{len(f['choices'])} choices in one question",
                            f"at most {len(LETTERS)} are lettered")
        listed = t["choice_separator"].join(t["choice"].format(letter=LETTERS[i], choice=c)
                                            for i, c in enumerate(f["choices"]))
        return t["prompt_with_choices"].format(question=f["question"], choice_list=listed)
    return t["prompt"].format(question=f["question"])


def _messages(example: Example) -> list[dict[str, str]]:
    messages = [{"role": m["role"], "content": m["content"]} for m in example.fields["messages"]]
    bad = next((m["role"] for m in messages if m["role"] not in CHAT_ROLES), None)
    if bad is not None:  # a template renders an unknown role as it likes, or drops it silently
        raise UserError(f"{example.task}: chat message role {bad!r} is not one of {', '.join(CHAT_ROLES)}",
                        "fix the role in the data")
    return messages


def chat_segments(messages: list[dict[str, str]], tokenizer: Any,
                  chat_template: str | None = None) -> list[tuple[str, bool]]:
    """Segments of a conversation through the chat template (`chat_template`, else the
    tokenizer's own); assistant turns are trained.

    Each assistant turn is the difference between the rendering that ends with it and the
    rendering of the turns before it plus the generation prompt, so the trained text is exactly
    what the model must produce after the template's own "assistant" header (end-of-turn marker
    included: the model learns to stop). An assistant turn that opens the conversation answers
    nothing and stays untrained context (rows.py keeps only rows with a later one). Turns after
    the last assistant turn teach nothing and are dropped."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        head = _apply(tokenizer, messages[:i], generation_prompt=True, chat_template=chat_template)
        full = _apply(tokenizer, messages[: i + 1], generation_prompt=False, chat_template=chat_template)
        if not (head.startswith(done) and full.startswith(head)):
            raise UserError("this tokenizer's chat template rewrites earlier turns, so assistant turns "
                            "cannot be located in the rendered text",
                            "use template: default, or a model whose chat template only appends")
        segments += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    return [(text, trained) for text, trained in segments if text]


def _apply(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool,
           chat_template: str | None = None) -> str:
    if tokenizer is None or not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise UserError("this data needs a chat template, and the tokenizer has none",
                        "use template: default, a named format (template: llama3, qwen, mistral, gemma "
                        "or alpaca), or a model whose tokenizer has a chat template")
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=generation_prompt)
