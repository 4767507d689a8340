"""The `k2serve` command. Each subcommand lives with the plane it belongs to and parses its own arguments,
so this module only dispatches (and imports nothing heavy until a subcommand is chosen)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "up": ("k2serve.router.up", "main", "run the whole stack locally (Ray, prefill + decode groups, router, HTTP)"),
    "pools": ("k2serve.worker.parallel.pools", "main", "run the pool controller (a Ray driver)"),
    "chat": ("k2serve.router.chat", "main", "send one chat request; print thinking, tool calls and answer"),
    "quantize": ("k2serve.worker.quantize", "main", "bf16 HF checkpoint -> INT4 pack-quantized (K2 layout)"),
    "crd": ("k2serve.operator.crd", "main", "print the K2Deployment CRD YAML"),
    "operator": ("k2serve.operator.run", "main", "run the kopf operator"),
    "chains": ("k2serve.router.chains.cli", "main", "inspect durable reasoning chains"),
    "bench": ("k2serve.bench_cli", "main", "run a benchmark from bench/"),
    "download": ("k2serve.download", "main", "download a model (hf://ORG/NAME[@REV]) into a folder, once"),
    "plan": ("k2serve.plan_cli", "main", "capacity plan: per-GPU bytes, KV budget, fit (no cluster needed)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: k2serve COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"k2serve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
