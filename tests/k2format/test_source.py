"""`builtin:tiny-k2` as a router resolves it: config and tokenizer only, the same model the workers load."""

from __future__ import annotations

from pathlib import Path

from k2serve.k2format.model_config import K2Config
from k2serve.k2format.source import BUILTIN_TINY, resolve_model
from k2serve.k2format.tokenizer import K2Tokenizer
from k2serve.worker.loader import resolve_checkpoint


def test_tiny_format_has_no_weights_and_matches_the_checkpoint(tmp_path: Path) -> None:
    fmt = resolve_model(BUILTIN_TINY, cache_dir=tmp_path)
    assert fmt.parent == tmp_path and (fmt / "config.json").is_file() and (fmt / "tokenizer_config.json").is_file()
    assert not list(fmt.glob("*.safetensors*"))
    assert resolve_model(BUILTIN_TINY, cache_dir=tmp_path) == fmt  # cached
    full = resolve_checkpoint(BUILTIN_TINY, cache_dir=tmp_path)
    assert full != fmt and list(full.glob("*.safetensors"))
    # The same model: the router's view differs only by not describing the weights' quantization.
    assert K2Config.from_dir(full).model_copy(update={"quantization": None}) == K2Config.from_dir(fmt)
    text = "<think>hi</think> héllo"
    assert K2Tokenizer.from_dir(fmt).encode(text) == K2Tokenizer.from_dir(full).encode(text)
