"""K2's tokenizer: tiktoken BPE from `tiktoken.model` plus the special tokens of `tokenizer_config.json`, the same
files moonshotai/Kimi-K2-Thinking ships, so the built-in tiny model and the real checkpoint load through one path."""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tiktoken

from k2serve.k2format.chat_template import ChatTemplate

# Kimi K2's pre-tokenizer (tokenization_kimi.py): Han runs split from other letters, digits in groups of three.
K2_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# K2 reserves 256 ids after the BPE ranks for special tokens; unnamed ones are `<|reserved_token_{id}|>`.
NUM_RESERVED_SPECIAL = 256
K2_FIRST_SPECIAL = 163584
K2_SPECIAL_TOKENS: dict[str, int] = {
    "[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587, "<|im_assistant|>": 163588,
    "<|start_header_id|>": 163590, "<|end_header_id|>": 163591, "[EOT]": 163593, "<|im_system|>": 163594,
    "<|tool_calls_section_begin|>": 163595, "<|tool_calls_section_end|>": 163596, "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599, "<|im_middle|>": 163601,
    "<think>": 163606, "</think>": 163607, "[UNK]": 163838, "[PAD]": 163839,
}
# K2 serving stops on any of these: [EOS], the end of an assistant turn, and [EOT].
STOP_TOKEN_NAMES = ("[EOS]", "<|im_end|>", "[EOT]")

# tiktoken's BPE is quadratic in the length of one pre-token; K2's tokenizer bounds both the text handed to
# tiktoken at once and runs of (non-)whitespace, and so must we to produce the same ids.
MAX_ENCODE_CHARS = 400_000
MAX_SAME_CLASS_RUN = 25_000
_LONG_RUN = re.compile(rf"\s{{{MAX_SAME_CLASS_RUN + 1},}}|\S{{{MAX_SAME_CLASS_RUN + 1},}}")


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or malformed; the message names the file (and line)."""


def _read_ranks(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise TokenizerFileError(f"{path}: missing (a K2 tokenizer folder holds tiktoken.model)")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64-token rank'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerFileError(f"{path}:{lineno}: corrupt line {line[:60]!r} ({e})") from None
        if token in ranks:
            raise TokenizerFileError(f"{path}:{lineno}: token {token!r} listed twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerFileError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    if len(ranks) < 256:
        raise TokenizerFileError(f"{path}: only {len(ranks)} ranks; byte-level BPE needs all 256 single bytes")
    return ranks


def _token_content(value: Any) -> str | None:
    # bos_token / eos_token are either a plain string or a serialised AddedToken ({"content": ...}).
    return value.get("content") if isinstance(value, dict) else value


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TokenizerFileError(f"{path}: missing (a K2 tokenizer folder holds tokenizer_config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("added_tokens_decoder", {}), dict):
        raise TokenizerFileError(f"{path}: expected an object with an 'added_tokens_decoder' object")
    return config


def _special_tokens(config: dict[str, Any], num_base: int, path: Path) -> dict[str, int]:
    specials: dict[str, int] = {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        try:
            token_id, content = int(key), entry["content"]
        except (ValueError, TypeError, KeyError):
            problem = f"added_tokens_decoder[{key!r}] needs an integer id and a 'content'"
            raise TokenizerFileError(f"{path}: {problem}") from None
        if token_id < num_base:
            raise TokenizerFileError(f"{path}: special token {content!r} id {token_id} collides with a BPE rank")
        specials[content] = token_id
    taken = set(specials.values())
    for token_id in range(num_base, num_base + NUM_RESERVED_SPECIAL):
        if token_id not in taken:
            specials[f"<|reserved_token_{token_id}|>"] = token_id
    return specials


def _split_long_runs(text: str) -> Iterator[str]:
    """Pieces of at most MAX_ENCODE_CHARS with no (non-)whitespace run longer than MAX_SAME_CLASS_RUN, cut where
    K2's tokenizer cuts (every MAX_SAME_CLASS_RUN characters into a long run)."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[start:start + MAX_ENCODE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(window):
            for at in range(run.start() + MAX_SAME_CLASS_RUN, run.end(), MAX_SAME_CLASS_RUN):
                yield window[cut:at]
                cut = at
        yield window[cut:]


@dataclass
class K2Tokenizer:
    encoding: tiktoken.Encoding
    special_tokens: dict[str, int]
    bos_token: str
    eos_token: str
    chat_template: ChatTemplate
    special_ids: frozenset[int] = field(init=False)

    _special: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        self.special_ids = frozenset(self.special_tokens.values())
        names = sorted(self.special_tokens, key=len, reverse=True)  # longest first, as tiktoken matches them
        self._special = re.compile("|".join(map(re.escape, names)))

    @classmethod
    def from_dir(cls, path: Path | str) -> K2Tokenizer:
        path = Path(path)
        config_path = path / "tokenizer_config.json"
        ranks = _read_ranks(path / "tiktoken.model")
        config = _read_config(config_path)
        specials = _special_tokens(config, len(ranks), config_path)
        bos = _token_content(config.get("bos_token")) or "[BOS]"
        eos = _token_content(config.get("eos_token")) or "[EOS]"
        for role, name in (("bos_token", bos), ("eos_token", eos)):
            if name not in specials:
                raise TokenizerFileError(f"{config_path}: {role} {name!r} is not in added_tokens_decoder")
        encoding = tiktoken.Encoding(name=path.name or "k2", pat_str=K2_PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=specials)
        template = ChatTemplate.for_model_dir(path, config.get("chat_template"))
        return cls(encoding, specials, bos, eos, template)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def bos_id(self) -> int:
        return self.special_tokens[self.bos_token]

    @property
    def eos_ids(self) -> list[int]:
        names = dict.fromkeys((self.eos_token, *STOP_TOKEN_NAMES))
        return [self.special_tokens[n] for n in names if n in self.special_tokens]

    def token_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token of this tokenizer") from None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids of `text`; with allow_special, special-token strings in it become their ids, else plain text."""
        ids: list[int] = []
        for piece in _split_long_runs(text):
            if not allow_special:
                ids += self.encoding.encode_ordinary(piece)
                continue
            # Encoded between special tokens, as tiktoken does inside one call: the same ids, but a long
            # conversation becomes one short call per message, and the GIL is free between calls (one call
            # over megabytes holds it for 100+ ms, stalling every stream of the router).
            cut = 0
            for special in self._special.finditer(piece):
                ids += self.encoding.encode_ordinary(piece[cut:special.start()])
                ids.append(self.special_tokens[special.group()])
                cut = special.end()
            ids += self.encoding.encode_ordinary(piece[cut:])
        return ids

    def decode_bytes(self, ids: list[int], skip_special: bool = False) -> bytes:
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        try:
            return self.encoding.decode_bytes(ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is outside the vocabulary of {self.vocab_size}") from None

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def incremental_decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special)

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True) -> str:
        return self.chat_template.render(messages, tools, add_generation_prompt)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids as K2 serving builds them: the rendered template, no [BOS] added. Only the template's
        structure produces special tokens: a special-token string inside a user, system or tool message's
        content is encoded as plain text, as K2's own API does. Content without one is encoded together with
        its surroundings, so such prompts get exactly the ids of the whole rendered string."""
        ids: list[int] = []
        pending = ""
        for segment in self.chat_template.render_segments(messages, tools, add_generation_prompt):
            if segment.content and self._holds_special(segment.text):
                ids += self.encode(pending) + self.encode(segment.text, allow_special=False)
                pending = ""
            else:
                pending += segment.text
        return ids + self.encode(pending)

    def _holds_special(self, text: str) -> bool:
        return any(name in text for name in self.special_tokens)


class IncrementalDecoder:
    """Text deltas for a stream of ids; a UTF-8 character split across tokens comes out once it is complete."""

    def __init__(self, tokenizer: K2Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: list[int]) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes(ids, self._skip_special))

    def flush(self) -> str:
        """What is left at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def write_tiny_tokenizer(directory: Path) -> None:
    """The built-in model's tokenizer: the 256 bytes as ranks (no merges) and K2's special tokens at the same
    offsets from the first special id as in K2, so a vocabulary of 512."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (directory / "tiktoken.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    decoder = {
        str(256 + k2_id - K2_FIRST_SPECIAL): {"content": name, "lstrip": False, "normalized": False,
                                              "rstrip": False, "single_word": False, "special": True}
        for name, k2_id in K2_SPECIAL_TOKENS.items()
    }
    config = {
        "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "model_max_length": 262144,
        "tokenizer_class": "TikTokenTokenizer",
        "chat_template": ChatTemplate.builtin().text,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
