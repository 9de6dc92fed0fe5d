r"""Built-in chat templates, as Jinja source, for checkpoints that ship without one.

Each renders the published prompt format of its family (with ``chat.render_chat_template`` or transformers'
``apply_chat_template``, which give identical output). Special tokens that a tokenizer defines are read from the
``bos_token``/``eos_token`` variables; tokens that only exist as added tokens (``<|im_start|>``) are spelled out.

- ``llama3``:  ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>`` (bos from ``bos_token``,
  contents stripped as Meta's template does); generation prompt ``<|start_header_id|>assistant<|end_header_id|>\n\n``.
- ``chatml``:  ``<|im_start|>user\nHi<|im_end|>\n``; generation prompt ``<|im_start|>assistant\n``. No system default.
- ``qwen``:    Qwen2.5's template: ChatML plus the default system prompt "You are Qwen, created by Alibaba Cloud. You
  are a helpful assistant." when none is given, ``tools`` in a ``<tools>`` block, assistant ``tool_calls`` as
  ``<tool_call>`` JSON and ``tool`` messages as ``<tool_response>`` inside a user turn. Chosen over a plain ChatML alias
  because a Qwen2.5 model expects exactly this prompt.
- ``mistral``: ``<s>[INST] {system}\n\n{user} [/INST] {answer}</s>[INST] {user} [/INST]`` (v0.1/v0.2 layout: the system
  message is prepended to the first user turn; roles must alternate). The prompt already ends the user turn, so
  ``add_generation_prompt`` adds nothing.
- ``alpaca``:  the Stanford Alpaca prompt: a system message or the default preamble, then
  ``### Instruction:\n{user}\n\n`` and ``### Response:\n{answer}</s>``; generation prompt ``### Response:\n``.
- ``glm3``:    ``[gMASK]sop<|system|>\n {system}<|user|>\n {user}<|assistant|>\n {answer}`` (ChatGLM3-6B's published
  template; the space after each newline is its SentencePiece prefix). No end-of-turn token: the next role token
  ends a turn, so ``<|user|>``/``<|observation|>`` are stop tokens. Generation prompt ``<|assistant|>``.
- ``glm4``:    ``[gMASK]<sop><|system|>\n{system}<|user|>\n{user}<|assistant|>\n{answer}`` (GLM-4-9B-chat without its
  tool-use system prompt); messages without content are skipped, as GLM-4's template does. Generation prompt
  ``<|assistant|>``; stop on ``<|user|>``/``<|observation|>``/``<|endoftext|>``.
"""
from __future__ import annotations

from lmforge.errors import ConfigError, did_you_mean

# Every line starts with "{{-" or "{%-" so the layout newlines are stripped, as in modern Hub templates.

_LLAMA3 = r"""
{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

_CHATML = r"""
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_QWEN = r"""
{%- set default_system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}
{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else default_system %}
{{- '<|im_start|>system\n' + system }}
{%- if tools %}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
{%- for tool in tools %}
{{- '\n' + tool | tojson }}
{%- endfor %}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' }}
{{- '<tool_call></tool_call> XML tags:\n<tool_call>\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in messages %}
{%- set plain_assistant = message['role'] == 'assistant' and not message.tool_calls %}
{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) or plain_assistant %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- elif message['role'] == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}
{{- '\n' + message.content }}
{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}
{%- set tool_call = tool_call.function %}
{%- endif %}
{{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' + tool_call.arguments | tojson + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message['role'] == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}
{{- '<|im_end|>\n' }}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_MISTRAL = r"""
{%- if messages[0]['role'] == 'system' %}
{%- set system_message = messages[0]['content'] %}
{%- set loop_messages = messages[1:] %}
{%- else %}
{%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('mistral template: after an optional system message, roles must alternate user/assistant/user/...') }}
{%- endif %}
{%- if message['role'] == 'user' %}
{{- '[INST] ' }}
{%- if loop.first and system_message is defined %}
{{- system_message + '\n\n' }}
{%- endif %}
{{- message['content'] + ' [/INST]' }}
{%- else %}
{{- ' ' + message['content'] | trim }}{{ eos_token }}
{%- endif %}
{%- endfor %}
"""

_ALPACA = r"""
{%- if messages[0]['role'] == 'system' %}
{{- messages[0]['content'] + '\n\n' }}
{%- set loop_messages = messages[1:] %}
{%- else %}
{{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}
{%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
{%- if message['role'] == 'user' %}
{{- '### Instruction:\n' + message['content'] + '\n\n' }}
{%- elif message['role'] == 'assistant' %}
{{- '### Response:\n' + message['content'] }}{{ eos_token }}
{%- if not loop.last or add_generation_prompt %}
{{- '\n\n' }}
{%- endif %}
{%- else %}
{{- raise_exception('alpaca template supports only system, user and assistant roles, got ' + message['role']) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '### Response:\n' }}
{%- endif %}
"""

_CHATGLM3 = r"""
{{- '[gMASK]sop' }}
{%- for message in messages %}
{{- '<|' + message['role'] + '|>\n ' + message['content'] }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|assistant|>' }}
{%- endif %}
"""

_GLM4 = r"""
{{- '[gMASK]<sop>' }}
{%- for message in messages %}
{%- if message['content'] %}
{{- '<|' + message['role'] + '|>\n' + message['content'] }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|assistant|>' }}
{%- endif %}
"""

BUILTIN_TEMPLATES: dict[str, str] = {
    "llama3": _LLAMA3.strip(),
    "chatml": _CHATML.strip(),
    "qwen": _QWEN.strip(),
    "mistral": _MISTRAL.strip(),
    "alpaca": _ALPACA.strip(),
    "glm3": _CHATGLM3.strip(),  # ChatGLM3 (LLaMA-Factory calls it chatglm3)
    "glm4": _GLM4.strip(),
}


def get_template(name: str) -> str:
    """Return the Jinja source of built-in template ``name``; a one-line ConfigError lists the names otherwise."""
    try:
        return BUILTIN_TEMPLATES[name]
    except KeyError:
        names = ", ".join(sorted(BUILTIN_TEMPLATES))
        raise ConfigError(
            f"chat_template: unknown built-in template {name!r}{did_you_mean(name, BUILTIN_TEMPLATES)}; use one of: {names}"
        ) from None
