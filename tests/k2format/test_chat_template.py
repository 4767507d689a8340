"""K2 Thinking chat template: exact strings written by hand from K2-FORMAT.md, and request validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2serve.k2format.chat_template import ChatTemplate, ChatTemplateError, sort_keys_deep

SYSTEM = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(call_id: str, name: str, arguments: str | dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.builtin()


def test_multi_turn_tool_conversation_renders_exactly(template: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
         "tool_calls": [call("functions.get_weather:0", "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny.", "reasoning_content": "Report it."},
        {"role": "user", "content": "And Rome and Oslo?"},
        {"role": "assistant", "content": "Checking both.", "reasoning_content": "Two calls.",
         "tool_calls": [call("functions.get_weather:1", "get_weather", '{"city": "Rome"}'),
                        call("functions.get_weather:2", "get_weather", {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "25C"},
        {"role": "tool", "tool_call_id": "functions.get_weather:2", "content": "3C\nwindy"},
    ]
    # Keys sorted at every depth and compact separators, as K2's own pipeline renders the declaration.
    tools_json = ('[{"function":{"description":"Current weather in a city","name":"get_weather","parameters":'
                  '{"properties":{"city":{"type":"string"}},"required":["city"],"type":"object"}},'
                  '"type":"function"}]')
    expected = (
        f"<|im_system|>tool_declare<|im_middle|>{tools_json}<|im_end|>"
        "<|im_system|>system<|im_middle|>You are a weather bot.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
        # history (up to the last plain answer): reasoning dropped
        "<|im_assistant|>assistant<|im_middle|><think></think>"
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n18C, sunny<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>It is 18C and sunny.<|im_end|>"
        # the current tool loop: reasoning kept
        "<|im_user|>user<|im_middle|>And Rome and Oslo?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>Two calls.</think>Checking both."
        "<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|>'
        '<|tool_call_begin|>functions.get_weather:2<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:1\n25C<|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:2\n3C\nwindy<|im_end|>"
        + GEN
    )
    assert template.render(messages, tools=[WEATHER_TOOL]) == expected


def test_default_system_message_only_without_a_system_turn(template: ChatTemplate) -> None:
    user = {"role": "user", "content": "hi"}
    assert template.render([user]) == SYSTEM + "<|im_user|>user<|im_middle|>hi<|im_end|>" + GEN
    own = [{"role": "system", "content": "Be brief."}, user]
    assert template.render(own, add_generation_prompt=False) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|>")
    assert template.render([]) == SYSTEM + GEN


def test_names_replace_the_role_in_headers(template: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "rules", "name": "moderator"},
        {"role": "user", "content": "hello", "name": "alice"},
        {"role": "assistant", "content": "hi alice", "name": "kimi"},
    ]
    assert template.render(messages, add_generation_prompt=False) == (
        "<|im_system|>moderator<|im_middle|>rules<|im_end|>"
        "<|im_user|>alice<|im_middle|>hello<|im_end|>"
        "<|im_assistant|>kimi<|im_middle|><think></think>hi alice<|im_end|>")


def test_reasoning_kept_only_after_the_last_plain_answer(template: ChatTemplate) -> None:
    loop = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "old thought"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "reasoning_content": "step one",
         "tool_calls": [call("functions.f:0", "f", "{}")]},
        {"role": "tool", "tool_call_id": "functions.f:0", "content": "ok"},
        {"role": "assistant", "reasoning_content": "step two",
         "tool_calls": [call("functions.f:1", "f", "{}")]},
        {"role": "tool", "tool_call_id": "functions.f:1", "content": "ok"},
    ]
    text = template.render(loop)
    assert "old thought" not in text
    assert "<|im_assistant|>assistant<|im_middle|><think></think>a1<|im_end|>" in text
    assert "<think>step one</think><|tool_calls_section_begin|>" in text
    assert "<think>step two</think><|tool_calls_section_begin|>" in text
    # once the loop ends in a plain answer, the whole loop becomes history
    closed = template.render(loop + [{"role": "assistant", "content": "done", "reasoning_content": "final"}])
    assert "step one" not in closed and "step two" not in closed and "final" not in closed
    assert closed.count("<think></think>") == 4


def test_content_parts_and_missing_content(template: ChatTemplate) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None}]
    assert template.render(messages, add_generation_prompt=False) == (
        SYSTEM + "<|im_user|>user<|im_middle|>ab<|im_end|><|im_assistant|>assistant<|im_middle|>"
        "<think></think><|im_end|>")


@pytest.mark.parametrize(("messages", "tools", "needle"), [
    ([{"role": "wizard", "content": "x"}], None, "messages[0][role]"),
    ([{"role": "tool", "content": "x"}], None, "tool_call_id"),
    ([{"role": "user", "content": "x", "tool_calls": [call("functions.f:0", "f", "{}")]}], None, "only assistant"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None, "messages[0][content"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "bad name!"}}], "tools[0]"),
    ([{"role": "user", "content": "x"}],
     [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "type 'object'"),
    ([{"role": "user", "content": "x"}], [{"type": "retrieval"}], "tools[0][type]"),
])
def test_bad_requests_get_clear_errors(template: ChatTemplate, messages: list, tools: list | None,
                                       needle: str) -> None:
    with pytest.raises(ChatTemplateError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        template.render(messages, tools)


def test_model_folder_template_wins(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    config_template = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
    assert ChatTemplate.for_model_dir(tmp_path, config_template).render(messages) == "[user:hi]"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no ' + messages[0].content) }}")
    folder = ChatTemplate.for_model_dir(tmp_path, config_template)
    with pytest.raises(ChatTemplateError, match="no hi"):
        folder.render(messages)
    assert ChatTemplate.for_model_dir(tmp_path / "absent", None).text == ChatTemplate.builtin().text


def test_tojson_is_plain_json_as_in_hugging_face(template: ChatTemplate) -> None:
    tool = {"type": "function", "function": {"name": "echo", "description": "<b>&'ü</b>"}}
    text = template.render([{"role": "user", "content": "x"}], tools=[tool])
    assert json.dumps(sort_keys_deep([tool]), ensure_ascii=False, separators=(",", ":")) in text


def test_template_that_does_not_compile_names_its_source(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja"):
        ChatTemplate.for_model_dir(tmp_path, None)


def test_fields_the_openai_client_echoes_back_are_ignored(template: ChatTemplate) -> None:
    echoed = {"role": "assistant", "content": "y", "refusal": None, "annotations": [], "audio": None,
              "function_call": None, "reasoning_content": "r"}
    assert template.render([{"role": "user", "content": "x"}, echoed], add_generation_prompt=False) == (
        SYSTEM + "<|im_user|>user<|im_middle|>x<|im_end|><|im_assistant|>assistant<|im_middle|>"
        "<think></think>y<|im_end|>")
