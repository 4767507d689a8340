"""Request bodies → prompt token ids and engine sampling parameters, with the 400s that belong there."""

from __future__ import annotations

from k2serve.router.http.errors import APIError
from k2serve.router.http.openai_models import ChatCompletionRequest, CompletionRequest, SamplingRequest
from k2serve.worker.chat_template import ChatTemplateError
from k2serve.sampling_params import SamplingParams
from k2serve.worker.tokenizer import K2Tokenizer


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"The model `{requested}` does not exist or you do not have access to it; "
                            f"this server serves `{served}`.", param="model", code="model_not_found")


def chat_prompt(tokenizer: K2Tokenizer, req: ChatCompletionRequest) -> list[int]:
    try:
        return tokenizer.encode_chat(req.template_messages(), req.template_tools())
    except ChatTemplateError as e:
        param = "tools" if str(e).startswith("tools") else "messages"
        raise APIError(400, str(e), param=param) from e


def completion_prompt(tokenizer: K2Tokenizer, req: CompletionRequest) -> list[int]:
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, allow_special=False)
    bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})",
                       param="prompt")
    return list(prompt)


def sampling_params(req: SamplingRequest, prompt_len: int, max_context: int, *,
                    top_logprobs: int | None, default_max_tokens: int) -> SamplingParams:
    """`top_logprobs`: None when no logprobs were asked, else how many alternatives per token;
    `default_max_tokens`: the budget of a request that sets none (at most what fits)."""
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
    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
        max_tokens=limit if limit is not None else min(room, default_max_tokens), ignore_eos=req.ignore_eos,
        logprobs=top_logprobs is not None, top_logprobs=top_logprobs or 0,
    )
