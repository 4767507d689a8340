"""K2 Thinking's chat template: request messages and tools validated, then rendered with jinja2's sandbox the way
Hugging Face's `apply_chat_template` renders them, so a model folder's own template gives the same prompt here."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, Field, ValidationError, model_validator

DEFAULT_TEMPLATE = "k2_thinking.jinja"


class ChatTemplateError(ValueError):
    """A request's messages or tools cannot be rendered; the message says which field is wrong."""


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class FunctionCall(BaseModel):
    name: str = Field(min_length=1)
    # OpenAI clients send a JSON string; a dict is accepted too and rendered as JSON.
    arguments: str | dict[str, Any]


class ToolCall(BaseModel):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    # Fields we do not render (the openai client echoes back `refusal`, `annotations`, ...) are ignored.
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _role_fields(self) -> Message:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role!r}")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError(f"tool_call_id belongs on tool messages, not {self.role!r}")
        return self


class FunctionSchema(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _parameters_are_an_object_schema(self) -> FunctionSchema:
        if self.parameters is not None and self.parameters.get("type", "object") != "object":
            raise ValueError(f"parameters must be a JSON schema of type 'object', got {self.parameters.get('type')!r}")
        return self


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSchema


def _describe(error: ValidationError, what: str) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        problems.append(f"{what}[{where}]: {item['msg']}" if where else f"{what}: {item['msg']}")
    return "; ".join(problems)


def validate_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked messages as plain dicts without unset fields (a template must not see `None` as text)."""
    checked = []
    for i, raw in enumerate(messages):
        try:
            checked.append(Message.model_validate(raw).model_dump(exclude_none=True))
        except ValidationError as e:
            raise ChatTemplateError(_describe(e, f"messages[{i}]")) from None
    return checked


def validate_tools(tools: list[dict[str, Any]]) -> None:
    for i, raw in enumerate(tools):
        try:
            ToolSpec.model_validate(raw)
        except ValidationError as e:
            raise ChatTemplateError(_describe(e, f"tools[{i}]")) from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Hugging Face replaces jinja2's HTML-escaping tojson with plain json.dumps; templates rely on it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def sort_keys_deep(value: Any) -> Any:
    """`value` with every dict's keys sorted, at every depth: K2's tokenizer (`tokenization_kimi.py`) sorts the
    tools this way before rendering, so the declaration's bytes do not depend on the client's key order."""
    if isinstance(value, dict):
        return {k: sort_keys_deep(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sort_keys_deep(v) for v in value]
    return value


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered prompt: `content` pieces are a user/system/tool message's text, which is tokenized
    as text (special-token strings in it stay text); the rest is the template's structure."""
    text: str
    content: bool


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(f"chat template refused the request: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """One compiled template. `source` names where it came from, for error messages."""

    def __init__(self, text: str, source: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            problem = f"chat template does not compile (line {e.lineno}): {e.message}"
            raise ChatTemplateError(f"{source}: {problem}") from None
        self.text = text
        self.source = source

    @classmethod
    def builtin(cls) -> ChatTemplate:
        text = resources.files("k2serve.k2format.templates").joinpath(DEFAULT_TEMPLATE).read_text(encoding="utf-8")
        return cls(text, f"builtin {DEFAULT_TEMPLATE}")

    @classmethod
    def for_model_dir(cls, model_dir: Path, config_template: str | None) -> ChatTemplate:
        """The folder's own template (`chat_template.jinja`, else tokenizer_config's `chat_template`), else K2's."""
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), str(jinja_file))
        if config_template:
            return cls(config_template, str(model_dir / "tokenizer_config.json"))
        return cls.builtin()

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        return self._render(validate_messages(messages), tools, add_generation_prompt)

    def render_segments(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                        add_generation_prompt: bool = True) -> list[Segment]:
        """The rendered prompt cut into structure and message content. Each user/system/tool content string is
        wrapped in a one-off marker before rendering and found again afterwards, so whatever the template does
        around it, the content's own characters are known."""
        checked = validate_messages(messages)
        nonce = secrets.token_hex(8)
        start, end = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
        for message in checked:
            if message["role"] == "assistant" or message.get("content") is None:
                continue
            if isinstance(message["content"], str):
                message["content"] = start + message["content"] + end
            else:
                for part in message["content"]:
                    part["text"] = start + part["text"] + end
        rendered = self._render(checked, tools, add_generation_prompt)
        segments: list[Segment] = []
        at = 0
        for found in re.finditer(f"{re.escape(start)}(.*?){re.escape(end)}", rendered, flags=re.DOTALL):
            segments += [Segment(rendered[at:found.start()], False), Segment(found.group(1), True)]
            at = found.end()
        segments.append(Segment(rendered[at:], False))
        if any(nonce in s.text for s in segments):
            raise ChatTemplateError(f"{self.source}: the template cut a message's content apart; its text cannot "
                                    "be told from the template's structure")
        return [s for s in segments if s.text]

    def _render(self, checked: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool) -> str:
        if tools:
            validate_tools(tools)
        try:
            # Keys sorted at every depth, as K2's own pipeline does: the declaration is the same whatever order
            # the client wrote them in.
            return self._template.render(messages=checked, tools=sort_keys_deep(tools) if tools else None,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.source}: rendering failed: {e}") from None
