"""OpenAI-compatible request and response bodies for chat completions, completions and models.

Requests ignore fields that do not change what is generated (`user`, `metadata`, ...) and validate the ones we
use with OpenAI's bounds, so a bad value is a 400 that names the field. A known field that would change the
output but is not supported is a 400 naming it, never a silent 200. `chain_id`, `deterministic` and
`max_reasoning_tokens` are k2serve extensions; `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids` and
`ignore_eos` are vLLM's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from k2serve.sampling_params import MAX_LOGIT_BIAS, MAX_TOOLS, MAX_TOP_LOGPROBS

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`


MAX_STOP_TOKEN_IDS = 64
# Fields of OpenAI's or vLLM's API that change what is generated and that k2serve does not implement: sending one
# with a value other than its no-op is a 400 naming it.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "functions": None, "function_call": None, "prediction": None, "audio": None, "modalities": ["text"],
    "reasoning_effort": None, "web_search_options": None, "suffix": None, "use_beam_search": False,
    "length_penalty": None, "min_tokens": 0, "bad_words": None, "allowed_token_ids": None, "guided_json": None,
    "guided_regex": None, "guided_choice": None, "guided_grammar": None, "structured_outputs": None,
    "logits_processors": None, "prompt_logprobs": None, "include_stop_str_in_output": False,
    "skip_special_tokens": True, "truncate_prompt_tokens": None, "continue_final_message": False,
}

_Text = Annotated[str, Field(min_length=1)]
_Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class FunctionSpec(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Request):
    type: Literal["function"] = "function"
    function: FunctionSpec


class SamplingRequest(_Request):
    """The parameters both endpoints share."""

    model: str | None = Field(None, description="Served model name; optional (the router serves one model).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, description="Default: whatever fits in the context.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="vLLM extension; 0 means off.")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(1, ge=1, le=128, description="Choices; at most router.limits.max_n. Each choice is a new chain "
                   "and samples with seed `seed + index` (the same request with n=1 and that seed gives it).")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0, description="vLLM extension; 1 means off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM extension; 0 means off.")
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None = (
        Field(None, max_length=MAX_LOGIT_BIAS, description="Token id (as a string) → bias added to its logit."))
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                                                     description="vLLM extension.")
    max_reasoning_tokens: int | None = Field(
        None, ge=0, description="k2serve: past this many thinking tokens the server closes the thinking section.")
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="Count and length bounded by router.limits (default 4 strings of 256 characters).")
    ignore_eos: bool = False
    chain_id: str | None = Field(None, min_length=1, max_length=128,
                                 description="k2serve: continue this chain (same as header X-K2-Chain-Id).")
    deterministic: bool | None = Field(None, description="k2serve: batch-invariant decoding for this request.")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, noop in UNSUPPORTED_FIELDS.items():
                if data.get(name) is not None and data[name] != noop:
                    raise ValueError(f"`{name}` is not supported by this server (it would change the output)")
        return data

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


class FunctionCallIn(_Request):
    name: str
    arguments: str


class ToolCallIn(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class MessageIn(BaseModel):
    """A conversation message as OpenAI clients send it; the chat template checks the combinations (a tool
    message needs tool_call_id, ...) and ignores the extra fields clients echo back."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = Field(None, description="An assistant turn's thinking, sent back in history.")
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: required exactly when type is 'json_schema'")
        return self


class ChatCompletionRequest(SamplingRequest):
    messages: list[MessageIn] = Field(min_length=1)
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens; wins if both.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and not self.tools:
            raise ValueError("tool_choice: a required or named tool choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools or ()}:
            raise ValueError(f"tool_choice: no tool named {self.tool_choice.function.name!r} in tools")
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: cannot be combined with a required or named tool_choice")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt shows the model: none when tool_choice is 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class CompletionRequest(SamplingRequest):
    prompt: _Text | _Ids | Annotated[list[_Text], Field(min_length=1, max_length=1)] | Annotated[
        list[_Ids], Field(min_length=1, max_length=1)] = Field(
        description="Text or token ids; a list of one prompt is accepted, several are not."
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: Literal[False] = Field(False, description="Only false is supported.")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]


# ---- responses (documented in the OpenAPI schema; handlers build them)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    chain_id: str | None = Field(None, description="k2serve, with n > 1: the choice's own chain.")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    chain_id: str | None = Field(None, description="k2serve, with n > 1: the choice's own chain.")


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "k2serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
