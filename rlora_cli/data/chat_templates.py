"""Named chat formats, for a base model being taught to chat whose tokenizer ships no chat template.

    data:
      datasets:
        - {path: chats.jsonl, kind: chat, template: llama3}   # llama3 | qwen | mistral | gemma | alpaca

Each format is one Jinja chat template in `CHAT_TEMPLATES`, written as its model family documents
the format; templates.py renders it with `tokenizer.apply_chat_template(..., chat_template=text)`,
the same path `template: chat` takes with the tokenizer's own template, so the assistant turns and
the loss-mask boundary are found exactly as they are there. The trainer saves the text itself with
the adapter (`templates.template_info`), so `rlora generate` and `rlora eval` rebuild old prompts
even after an entry here is edited.

The family's special tokens (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, ...) are written as text.
A tokenizer that lacks them in its vocabulary splits them into ordinary pieces: the format is still
learned, only in more tokens, so that is allowed rather than an error. Each template writes the
tokenizer's own BOS and EOS where the family's does, and only when the tokenizer has one.
A role a format has no place for (a tool turn in Gemma's) raises, and templates.py turns that into
one line naming the task.
"""

from __future__ import annotations

_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"


def _no_role(name: str) -> str:
    return "{{ raise_exception('the " + name + " format has no ' + message['role'] + ' role') }}"


def _system_before_user(name: str) -> str:
    """Mistral and Gemma have no system turn: the family puts system text at the head of the next
    user turn. An assistant turn while system text waits would silently drop it, so it raises."""
    return ("{% if ns.system %}{{ raise_exception('the " + name + " format puts a system message "
            "into the user turn after it, and this one is followed by an assistant turn') }}{% endif %}")


# Llama 3 (Meta's model card): every turn is <|start_header_id|>role<|end_header_id|>\n\n content
# <|eot_id|>, the content trimmed; Llama 3.1 names the tool-output role "ipython".
LLAMA3 = (
    _BOS + "{% for message in messages %}"
    "{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# ChatML, Qwen's format: <|im_start|>role\n content <|im_end|>\n; no BOS. (Qwen's instruct
# tokenizers add a default system message; a base model being taught gets none it was not given.)
QWEN = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Mistral Instruct (docs.mistral.ai): <s>[INST] user [/INST] answer</s>[INST] next [/INST] ...
# The space the docs show before the answer is the word-start mark SentencePiece puts on the
# answer's first token, which rlora tokenizes on its own, so the text holds none. System text
# opens the next user turn; there is no generation prompt (the user turn ends with [/INST]).
MISTRAL = (
    _BOS + "{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}" + _system_before_user("mistral")
    + "{{ message['content'] + (eos_token or '') }}"
    "{% else %}" + _no_role("mistral") + "{% endif %}{% endfor %}"
)

# Gemma (ai.google.dev/gemma/docs/formatting): <start_of_turn>user\n ... <end_of_turn>\n, the
# assistant's role is "model"; system instructions go at the head of the first user prompt.
GEMMA = (
    _BOS + "{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + message['content'] | trim + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<start_of_turn>user\\n' + ns.system + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}" + _system_before_user("gemma")
    + "{{ '<start_of_turn>model\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% else %}" + _no_role("gemma") + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Stanford Alpaca: the task description (a system message replaces it), then "### Instruction:"
# and "### Response:" blocks; the response ends with EOS, as Alpaca trained it. One turn reads
# exactly as Alpaca's prompt_no_input followed by the output.
ALPACA_HEAD = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")
ALPACA = (
    "{% set ns = namespace(answered=false) %}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% else %}{{ '" + ALPACA_HEAD + "\\n\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% if not loop.first %}{{ raise_exception('the alpaca format "
    "has one system message, at the start (it replaces the task description)') }}{% endif %}"
    "{% elif message['role'] == 'user' %}"
    "{{ ('\\n\\n' if ns.answered else '') + '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% set ns.answered = false %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ('\\n\\n' if ns.answered else '') + '### Response:\\n' + message['content'] + (eos_token or '') }}"
    "{% set ns.answered = true %}"
    "{% else %}" + _no_role("alpaca") + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ('\\n\\n' if ns.answered else '') + '### Response:\\n' }}{% endif %}"
)

# config.CHAT_FORMATS lists these names (the recipe check needs them; tests keep the two equal).
CHAT_TEMPLATES: dict[str, str] = {"llama3": LLAMA3, "qwen": QWEN, "mistral": MISTRAL, "gemma": GEMMA,
                                  "alpaca": ALPACA}
