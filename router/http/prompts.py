"""Request bodies → prompt token ids and engine sampling parameters, with the 400s that belong there."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from k2serve.router.http.errors import APIError
from k2serve.k2format.chat_template import ChatTemplateError
from k2serve.k2format.tokenizer import K2Tokenizer
from k2serve.router.http.openai_models import (ChatCompletionRequest, CompletionRequest, NamedToolChoice,
                                               SamplingRequest)
from k2serve.sampling_params import MAX_SCHEMA_CHARS, Constraint, SamplingParams, ToolSchema


def check_model(requested: str | None, served: str, aliases: frozenset[str] = frozenset()) -> None:
    """`served` is the name /v1/models lists; `aliases` are other names of the same model."""
    if requested is not None and requested != served and requested not in aliases:
        raise APIError(404, f"The model `{requested}` does not exist or you do not have access to it; "
                            f"this server serves `{served}`.", param="model", code="model_not_found")


def chat_prompt(tokenizer: K2Tokenizer, req: ChatCompletionRequest) -> list[int]:
    try:
        return tokenizer.encode_chat(req.template_messages(), req.template_tools())
    except ChatTemplateError as e:
        param = "tools" if str(e).startswith("tools") else "messages"
        raise APIError(400, str(e), param=param) from e


def completion_prompt(tokenizer: K2Tokenizer, req: CompletionRequest) -> list[int]:
    """The rule for /v1/completions: a text prompt is text (special-token strings in it stay text, as in chat
    content); a token-id prompt goes to the model as given, special ids included, since a client that sends ids
    has built the structure itself. Only ids outside the vocabulary are refused."""
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, allow_special=False)
    bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})",
                       param="prompt")
    return list(prompt)


def sampling_params(req: SamplingRequest, prompt_len: int, max_context: int, *, top_logprobs: int | None,
                    default_max_tokens: int, reasoning_budget: int | None = None) -> SamplingParams:
    """`top_logprobs`: None when no logprobs were asked, else how many alternatives per token;
    `default_max_tokens`: the budget of a request that sets none (at most what fits);
    `reasoning_budget`: the server's default for chat turns that set no max_reasoning_tokens."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    room = max_context - prompt_len
    limit = req.token_limit
    if room <= 0 or (limit is not None and limit > room):
        asked = prompt_len + (limit or 0)
        raise APIError(400, f"This model's maximum context length is {max_context} tokens. However, you requested "
                            f"{asked} tokens ({prompt_len} in the prompt, {limit or 0} for the completion). "
                            "Please reduce the length of the prompt or of max_tokens.",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    chat = isinstance(req, ChatCompletionRequest)
    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
        max_tokens=limit if limit is not None else min(room, default_max_tokens), ignore_eos=req.ignore_eos,
        logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, stop_token_ids=list(req.stop_token_ids or ()),
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        constraint=constraint(req) if chat else None,
        max_reasoning_tokens=req.max_reasoning_tokens if req.max_reasoning_tokens is not None or not chat
        else reasoning_budget,
    )


def constraint(req: ChatCompletionRequest) -> Constraint | None:
    """What the answer must be: a JSON value (`response_format`), or tool calls (`tool_choice` required or named,
    or `strict` tools under `auto`, whose calls follow their schemas when the model makes one)."""
    parallel = req.parallel_tool_calls is not False
    choice = req.tool_choice
    tools = req.tools or []
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        return Constraint(kind="tool_calls", tools=_tool_schemas(named), parallel=parallel)
    if choice == "required":
        return Constraint(kind="tool_calls", tools=_tool_schemas(tools), parallel=parallel)
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        return Constraint(kind="json", json_schema='{"type": "object"}')
    if fmt is not None and fmt.json_schema is not None:
        schema = fmt.json_schema.schema_
        _check_schema(schema, "response_format.json_schema.schema")
        return Constraint(kind="json", json_schema=json.dumps(schema))
    if choice != "none" and any(t.function.strict for t in tools):
        return Constraint(kind="tool_calls", tools=_tool_schemas(tools), parallel=parallel, required=False)
    return None


def _tool_schemas(tools: list[Any]) -> list[ToolSchema]:
    out = []
    for i, t in enumerate(tools):
        schema = t.function.parameters if t.function.parameters is not None else {"type": "object"}
        _check_schema(schema, f"tools.{i}.function.parameters")
        out.append(ToolSchema(name=t.function.name, parameters=json.dumps(schema)))
    return out


def _check_schema(schema: dict[str, Any], param: str) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise APIError(400, f"{param}: not a valid JSON schema: {e.message}", param=param) from None
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise APIError(400, f"{param}: longer than {MAX_SCHEMA_CHARS} characters as JSON", param=param)
