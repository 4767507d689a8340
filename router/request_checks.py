"""The counts and sizes inside a parsed API request (`RouterConfig.limits`), one policy for the HTTP front and the
router's gRPC: a request past a limit raises `LimitExceeded` naming the limit, before any turn starts."""

from __future__ import annotations

import json
from typing import Any

from k2serve.config import RequestLimits
from k2serve.sampling_params import SamplingParams


class LimitExceeded(ValueError):
    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code  # the limit's field in router.limits (or invalid_unicode)
        self.param = param


def check_request(limits: RequestLimits, *, stop: list[str], messages: list[dict[str, Any]] | None = None,
                  tools: list[dict[str, Any]] | None = None, prompt: Any = None) -> None:
    """LimitExceeded naming the limit for a parsed request past one, or for text that is not Unicode (a lone
    surrogate from a JSON escape) — before any turn starts, not when the text is tokenized or stored."""
    try:  # piece by piece: a big conversation's check yields the GIL between messages
        for part in (stop, tools, prompt, *(messages or ())):
            json.dumps(part, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise LimitExceeded(f"the request holds text that is not valid Unicode: {e.reason}",
                            code="invalid_unicode") from None
    if len(stop) > limits.max_stop_strings:
        raise LimitExceeded(f"{len(stop)} stop strings; the limit is {limits.max_stop_strings} "
                            "(router.limits.max_stop_strings)", param="stop", code="max_stop_strings")
    longest = max((len(s) for s in stop), default=0)
    if longest > limits.max_stop_chars:
        raise LimitExceeded(f"a stop string of {longest} characters; the limit is {limits.max_stop_chars} "
                            "(router.limits.max_stop_chars)", param="stop", code="max_stop_chars")
    if messages is not None and len(messages) > limits.max_messages:
        raise LimitExceeded(f"{len(messages)} messages; the limit is {limits.max_messages} "
                            "(router.limits.max_messages)", param="messages", code="max_messages")
    if tools is not None:
        if len(tools) > limits.max_tools:
            raise LimitExceeded(f"{len(tools)} tools; the limit is {limits.max_tools} (router.limits.max_tools)",
                                param="tools", code="max_tools")
        for i, tool in enumerate(tools):
            size = len(json.dumps(tool, ensure_ascii=False).encode())
            if size > limits.max_tool_schema_bytes:
                raise LimitExceeded(f"tools[{i}] is {size} bytes of JSON; the limit is "
                                    f"{limits.max_tool_schema_bytes} (router.limits.max_tool_schema_bytes)",
                                    param="tools", code="max_tool_schema_bytes")


def check_chain_id(limits: RequestLimits, chain_id: str) -> None:
    if len(chain_id) > limits.max_chain_id_chars:
        raise LimitExceeded(f"a chain id of {len(chain_id)} characters; the limit is {limits.max_chain_id_chars} "
                            "(router.limits.max_chain_id_chars)", param="chain_id", code="max_chain_id_chars")


def check_prompt(prompt: list[int], sampling: SamplingParams, vocab: int, max_context: int) -> None:
    """ValueError for token ids outside the vocabulary (prompt or logit_bias), an empty prompt, or a turn that
    cannot fit the context."""
    if not prompt:
        raise ValueError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {bad[:5]}")
    bad = [t for t in sampling.logit_bias if t >= vocab]
    if bad:
        raise ValueError(f"logit_bias token ids must lie in [0, {vocab}); got {bad[:5]}")
    if len(prompt) + sampling.max_tokens > max_context:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                         f"context limit of {max_context} tokens")
