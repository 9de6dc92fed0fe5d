"""Chat templates: byte-identical to transformers' apply_chat_template, built-ins match their published formats."""
from __future__ import annotations

import json

import jinja2
import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import (
    BUILTIN_TEMPLATES,
    ChatTemplateError,
    Tokenizer,
    get_template,
    render_chat_template,
    save_pretrained_tokenizer,
    train_bpe,
)
from lmforge.tokenizer.chat import compile_chat_template

transformers = pytest.importorskip("transformers")

# The reference's own rendering changed over 5.x (reasoning-field aliases, None tools in message loops); the CI
# installs the current release, the GPU machine an older one. Compare where the reference is the one we mirror.
_V = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
recent_reference = pytest.mark.skipif(_V < (5, 23), reason=f"transformers {transformers.__version__} renders "
                                                           "these cases as older releases did")

CORPUS = ["system user assistant: the weather in Paris is sunny, tools and functions. 你好\n" * 40]

CHAT = [
    {"role": "system", "content": "You are terse. <b>&'\"</b>"},
    {"role": "user", "content": "  Hi there! 你好 😀  "},
    {"role": "assistant", "content": "Hello.", "tool_calls": None},  # None keys are dropped, as in transformers
    {"role": "user", "content": "Weather?"},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in <city> & 'region' — 天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CHAT = [
    {"role": "user", "content": "What's the weather in 北京?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
    {"role": "tool", "content": '{"temp": 20}'},
]

# A Llama-3.1-style template: strftime_now, tojson(indent=...), namespace, loop controls, optional keys.
REALISTIC = r"""
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\nToday Date: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {{- "You may call these functions:\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'ignored' %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|start_header_id|>' + message['role'] }}
    {%- if message.tool_calls is defined %}{{- ' calls' }}{%- endif %}
    {{- '<|end_header_id|>\n\n' }}
    {%- if message.tool_calls is defined %}
        {%- for call in message.tool_calls %}{{- call.function | tojson(sort_keys=True) }}{%- endfor %}
    {%- else %}
        {{- message['content'] | trim }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
{{- '' if ns.turns else raise_exception('no turns') }}
"""

# Old-style template without "-" whitespace control: only right with trim_blocks + lstrip_blocks.
CLASSIC = """{% for message in messages %}
    {% if message['role'] == 'user' %}
<|user|>
{{ message['content'] }}{{ eos_token }}
    {% elif message['role'] == 'assistant' %}
<|assistant|>
{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}
    {% else %}
<|{{ message['role'] }}|>
{{ message['content'] }}{{ eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
<|assistant|>
    {% endif %}
{% endfor %}"""


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_tok")
    save_pretrained_tokenizer(train_bpe(CORPUS, vocab_size=320), out, bos_token="<s>", eos_token="</s>",
                              pad_token="<pad>", chat_template=BUILTIN_TEMPLATES["qwen"])
    return out


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def _both(hf_tok, template, messages, **kwargs):
    """(ours, transformers') rendering of the same call."""
    ours = render_chat_template(template, messages, **{**hf_tok.special_tokens_map, **kwargs})
    ref = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    return ours, ref


@pytest.mark.parametrize("gen", [False, True], ids=["no_gen", "gen"])
@pytest.mark.parametrize("template", [*BUILTIN_TEMPLATES, "realistic", "classic"])
def test_matches_transformers(hf_tok, template, gen):
    if template == "realistic" and _V < (5, 23):
        pytest.skip("older transformers cannot render this template with tool_calls=None")
    source = {"realistic": REALISTIC, "classic": CLASSIC}.get(template) or BUILTIN_TEMPLATES[template]
    messages = CHAT
    ours, ref = _both(hf_tok, source, messages, add_generation_prompt=gen, date_string="26 Jul 2024")
    assert ours == ref
    # the Tokenizer wrapper passes the same special tokens
    wrapper = Tokenizer(hf_tok.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                        chat_template=source)
    assert wrapper.apply_chat_template(messages, add_generation_prompt=gen, date_string="26 Jul 2024") == ref


@recent_reference
def test_tools_tojson_no_html_escape_keeps_unicode(hf_tok):
    for template in (BUILTIN_TEMPLATES["qwen"], REALISTIC):
        ours, ref = _both(hf_tok, template, TOOL_CHAT, tools=[WEATHER_TOOL], add_generation_prompt=True)
        assert ours == ref
        assert "<city> & 'region' — 天气" in ours and '"city": "北京"' in ours
    assert _both(hf_tok, REALISTIC, CHAT)[0] == _both(hf_tok, REALISTIC, CHAT)[1]  # strftime_now date


@recent_reference
def test_reasoning_aliases_and_plain_data(hf_tok):
    template = "{% for m in messages %}[{{ m.reasoning_content }}|{{ m.thinking }}]{{ m.content }}{% endfor %}"
    messages = [{"role": "assistant", "content": "42", "reasoning": "think"}]
    ours, ref = _both(hf_tok, template, messages)
    assert ours == ref == "[think|think]42"


def test_builtin_formats(hf_tok):
    sp = hf_tok.special_tokens_map
    two = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
           {"role": "user", "content": "V"}]
    expect = {
        "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
                  "\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|><|start_header_id|>user"
                  "<|end_header_id|>\n\nV<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
                  "<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n",
        "mistral": "<s>[INST] S\n\nU [/INST] A</s>[INST] V [/INST]",
        "alpaca": "S\n\n### Instruction:\nU\n\n### Response:\nA</s>\n\n### Instruction:\nV\n\n### Response:\n",
    }
    expect["qwen"] = expect["chatml"]
    for name, text in expect.items():
        assert render_chat_template(get_template(name), two, add_generation_prompt=True, **sp) == text, name
    user = [{"role": "user", "content": "U"}]
    assert render_chat_template(get_template("qwen"), user) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nU<|im_end|>\n")
    assert render_chat_template(get_template("alpaca"), user, add_generation_prompt=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nU\n\n### Response:\n")
    tool_text = render_chat_template(get_template("qwen"), TOOL_CHAT, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert tool_text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
        "signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat's the weather in 北京?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n"
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 20}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_raise_exception_both_raise(hf_tok):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        hf_tok.apply_chat_template(bad, chat_template=get_template("mistral"), tokenize=False)
    with pytest.raises(ChatTemplateError, match="roles must alternate") as e:
        render_chat_template(get_template("mistral"), bad)
    assert isinstance(e.value, LmforgeError) and isinstance(e.value, jinja2.TemplateError)
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat_template("{% for m in messages %}", bad)


def test_compiled_once():
    template = "{{ messages[0]['content'] }}!"
    render_chat_template(template, [{"role": "user", "content": "x"}])
    hits = compile_chat_template.cache_info().hits
    assert render_chat_template(template, [{"role": "user", "content": "y"}]) == "y!"
    assert compile_chat_template.cache_info().hits == hits + 1


def test_template_sources(tok_dir, tmp_path, hf_tok):
    msgs = [{"role": "user", "content": "U"}]
    # from tokenizer_config.json (a string), and transformers agrees
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.chat_template == BUILTIN_TEMPLATES["qwen"]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == hf_tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(msgs, tokenize=True) == hf_tok.apply_chat_template(msgs, return_dict=False)

    # chat_template.jinja beats the config's string (transformers >= 4.43 layout)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(BUILTIN_TEMPLATES["llama3"], encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == BUILTIN_TEMPLATES["llama3"]
    assert tok.apply_chat_template(msgs) == transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        msgs, tokenize=False)

    # a list of named templates in the config: "default", and "tool_use" when tools are given
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                               {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template(msgs) == "DU" and tok.apply_chat_template(msgs, tools=[WEATHER_TOOL]) == "T1"

    # an explicit chat_template replaces the checkpoint's
    assert Tokenizer.from_dir(tmp_path, chat_template="chatml").chat_template == BUILTIN_TEMPLATES["chatml"]


def test_template_errors(tok_dir, tmp_path):
    with pytest.raises(LmforgeError, match=r"unknown built-in template 'chatm' \(did you mean 'chatml'\?\)") as e:
        get_template("chatm")
    assert all(name in str(e.value) for name in BUILTIN_TEMPLATES) and "\n" not in str(e.value)
    with pytest.raises(LmforgeError, match="unknown built-in template"):
        Tokenizer.from_dir(tok_dir, chat_template="llama-3")

    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(LmforgeError, match="has no chat template; pass chat_template=<one of alpaca, chatml") as e:
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LmforgeError, match=r"messages\[0\] must be a dict"):
        render_chat_template("x", ["hello"])
