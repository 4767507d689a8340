"""The committed generated proto code is what `python -m k2serve.proto.generate` makes from k2serve.proto.

The generators stamp their own release into the output (protobuf's gencode version check, grpc's
GRPC_GENERATED_VERSION); those stamps are compared apart from the rest, so a newer grpcio-tools patch release
does not make the committed code stale, while any change to the messages or services does."""

from __future__ import annotations

import re
from pathlib import Path

from k2serve.proto import generate

# (pattern, replacement): each generator's version stamp, reduced to a placeholder
STAMPS = (
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
     r"\1 X, X, X,"),
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = 'X'"),
)


def without_stamps(text: str) -> str:
    for pattern, placeholder in STAMPS:
        text = pattern.sub(placeholder, text)
    return text


def test_generated_code_is_current(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    for name in generate.GENERATED:
        fresh, committed = (tmp_path / name).read_text(), (generate.HERE / name).read_text()
        assert without_stamps(fresh) == without_stamps(committed), (
            f"k2serve/proto/{name} is stale: run python -P -m k2serve.proto.generate")


def test_stamps_are_masked_and_nothing_else() -> None:
    committed = (generate.HERE / "k2serve_pb2_grpc.py").read_text()
    other_release = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '9.99.9'", committed)
    assert other_release != committed and without_stamps(other_release) == without_stamps(committed)
    pb2 = (generate.HERE / "k2serve_pb2.py").read_text()
    assert without_stamps(pb2) != pb2  # both protobuf stamps are found in the committed file
    assert without_stamps(pb2.replace("GenerateRequest", "GenerateRequesT")) != without_stamps(pb2)
