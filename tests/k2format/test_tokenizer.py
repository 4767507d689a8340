"""K2 tokenizer: tiktoken.model + tokenizer_config.json loading, K2's pre-tokenizer, specials, streaming decode."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from k2serve.k2format.chat_template import ChatTemplate
from k2serve.k2format.tokenizer import (
    K2_FIRST_SPECIAL, K2_SPECIAL_TOKENS, MAX_SAME_CLASS_RUN, K2Tokenizer, TokenizerFileError, _split_long_runs,
    write_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> K2Tokenizer:
    return K2Tokenizer.from_dir(tiny_dir)


def test_tiny_vocab_carries_every_k2_special_at_its_offset(tiny: K2Tokenizer) -> None:
    assert tiny.vocab_size == 512
    for name, k2_id in K2_SPECIAL_TOKENS.items():
        assert tiny.token_id(name) == 256 + k2_id - K2_FIRST_SPECIAL
    assert (tiny.token_id("[BOS]"), tiny.token_id("[EOS]"), tiny.token_id("<|im_end|>")) == (256, 257, 258)
    assert tiny.token_id("</think>") == 279
    assert tiny.token_id("<|reserved_token_261|>") == 261
    assert tiny.special_ids == frozenset(range(256, 512))
    assert tiny.bos_id == 256
    assert tiny.eos_ids == [257, 258, 265]
    with pytest.raises(KeyError, match="not a special token"):
        tiny.token_id("<|nope|>")


def test_tiny_files_use_k2_formats(tiny_dir: Path) -> None:
    lines = (tiny_dir / "tiktoken.model").read_text().splitlines()
    assert len(lines) == 256
    assert lines[65] == f"{base64.b64encode(b'A').decode()} 65"
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["279"]["content"] == "</think>"
    assert config["added_tokens_decoder"]["279"]["special"] is True
    assert config["chat_template"] == ChatTemplate.builtin().text


def test_encode_decode_with_and_without_specials(tiny: K2Tokenizer) -> None:
    text = "héllo<|im_end|>世"
    ids = tiny.encode(text)
    assert ids == [104, 195, 169, 108, 108, 111, 258, 228, 184, 150]
    assert tiny.decode(ids) == text
    assert tiny.decode(ids, skip_special=True) == "héllo世"
    as_text = tiny.encode(text, allow_special=False)
    assert 258 not in as_text and tiny.decode(as_text) == text
    with pytest.raises(ValueError, match="outside the vocabulary of 512"):
        tiny.decode([512])


def test_encoding_between_specials_gives_tiktokens_ids(tiny: K2Tokenizer) -> None:
    """`encode` cuts the text at special tokens (so the GIL is free between the calls); the ids are those of one
    tiktoken call over the whole text, on fresh random text with specials, their prefixes and neighbours."""
    import random

    rng = random.Random()
    specials = list(tiny.special_tokens)
    alphabet = ["a", " ", "\n", "é", "世", "<", "|", ">", "im", "<|", "|>", "<|im_"]
    for _ in range(200):
        parts = [rng.choice(specials) if rng.random() < 0.3 else "".join(rng.choices(alphabet, k=rng.randint(0, 9)))
                 for _ in range(rng.randint(0, 12))]
        text = "".join(parts)
        assert tiny.encode(text) == tiny.encoding.encode(text, allowed_special="all"), text


def test_incremental_decoder_never_splits_a_character(tiny: K2Tokenizer) -> None:
    text = "a€😀<think>中文</think>z"
    ids = tiny.encode(text)
    decoder = tiny.incremental_decoder()
    deltas = [decoder.push([i]) for i in ids]
    assert "".join(deltas) + decoder.flush() == text
    assert "\ufffd" not in "".join(deltas)
    assert deltas[:5] == ["a", "", "", "€", ""]  # € is three bytes, the emoji four
    skipping = tiny.incremental_decoder(skip_special=True)
    assert "".join(skipping.push([i]) for i in ids) == "a€😀中文z"
    cut = tiny.incremental_decoder()
    assert cut.push(tiny.encode("😀")[:2]) == ""
    assert cut.flush() == "\ufffd"


def write_bpe_folder(path: Path, merges: list[bytes]) -> None:
    """A K2-style folder with real merges: single bytes first, then `merges` in rank order."""
    vocab = [bytes([b]) for b in range(256)] + merges
    (path / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(vocab)))
    decoder = {str(len(vocab) + i): {"content": name, "special": True}
               for i, name in enumerate(["[BOS]", "[EOS]", "<|im_end|>"])}
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": decoder, "bos_token": {"content": "[BOS]"}, "eos_token": "[EOS]"}))


def test_k2_pre_tokenizer_bounds_merges(tmp_path: Path) -> None:
    han = "世".encode()
    merges = [b"he", b"ll", b"hell", b"hello", b"o" + han[:1], b"12", b"123", b"1234", han[:2], han, han + han]
    write_bpe_folder(tmp_path, merges)
    tok = K2Tokenizer.from_dir(tmp_path)
    rank = {t: 256 + i for i, t in enumerate(merges)}
    # Han runs are their own pre-tokens: no merge across "o|世", while "世世" merges inside the run.
    assert tok.encode("hello世世") == [rank[b"hello"], rank[han + han]]
    # digits go in groups of three, so "1234" (a rank) is never produced from text
    assert tok.encode("1234") == [rank[b"123"], ord("4")]
    # unnamed slots of the 256 reserved after the ranks are filled as K2 does
    first = 256 + len(merges)
    assert tok.vocab_size == first + 256
    assert tok.token_id(f"<|reserved_token_{first + 3}|>") == first + 3
    assert tok.eos_ids == [first + 1, first + 2]


def test_long_runs_are_cut_where_k2_cuts_them() -> None:
    n = MAX_SAME_CLASS_RUN
    text = "x" * 10 + " " * (2 * n + 100) + "y" * 5
    pieces = list(_split_long_runs(text))
    assert pieces == ["x" * 10 + " " * n, " " * n, " " * 100 + "y" * 5]
    assert list(_split_long_runs("short text")) == ["short text"]


def test_chat_template_comes_from_the_folder(tiny_dir: Path, tiny: K2Tokenizer, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    ids = tiny.encode_chat(messages)
    assert ids[0] == tiny.token_id("<|im_system|>")
    assert ids[-3:] == tiny.encode("assistant<|im_middle|>")[-3:]
    assert tiny.decode(ids) == tiny.apply_chat_template(messages)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert K2Tokenizer.from_dir(tmp_path).apply_chat_template(messages) == "hi!"


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("tiktoken.model", None, r"tiktoken.model: missing"),
    ("tiktoken.model", "QQ== 0\nnot-base64! 1\n", r"tiktoken.model:2: corrupt line"),
    ("tiktoken.model", "QQ== 0\nQg== 5\n", r"ranks must be exactly 0..1"),
    ("tokenizer_config.json", None, r"tokenizer_config.json: missing"),
    ("tokenizer_config.json", "{not json", r"tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"5": {"content": "[BOS]"}}}', r"collides with a BPE rank"),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"256": {"content": "[BOS]"}}, "eos_token": "[END]"}',
     r"eos_token '\[END\]' is not"),
])
def test_broken_folders_name_the_file(tiny_dir: Path, tmp_path: Path, name: str, content: str | None,
                                      needle: str) -> None:
    for file in ("tiktoken.model", "tokenizer_config.json"):
        (tmp_path / file).write_bytes((tiny_dir / file).read_bytes())
    if content is None:
        (tmp_path / name).unlink()
    else:
        (tmp_path / name).write_text(content)
    with pytest.raises(TokenizerFileError, match=needle):
        K2Tokenizer.from_dir(tmp_path)
