"""Regenerates k2serve_pb2.py / k2serve_pb2_grpc.py from k2serve.proto with grpcio-tools."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("k2serve_pb2.py", "k2serve_pb2_grpc.py", "k2serve_pb2.pyi")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    # Compile with the package path as the proto root so the generated imports read
    # `from k2serve.proto import k2serve_pb2`.
    root = HERE.parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "k2serve" / "proto"
        pkg.mkdir(parents=True)
        (pkg / "k2serve.proto").write_bytes((HERE / "k2serve.proto").read_bytes())
        rc = protoc.main(["grpc_tools.protoc", f"-I{tmp}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                          f"--grpc_python_out={tmp}", str(pkg / "k2serve.proto")])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} (root {root})")
        for name in GENERATED:
            (out_dir / name).write_bytes((pkg / name).read_bytes())


def main() -> int:
    generate(HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
