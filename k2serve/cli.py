"""The `k2serve` command. Each subcommand lives with the plane it belongs to and parses its own arguments,
so this module only dispatches (and imports nothing heavy until a subcommand is chosen)."""

from __future__ import annotations

import importlib
import os
import sys

from k2serve.errors import UserError

DEBUG_ENV = "K2SERVE_DEBUG"

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "up": ("k2serve.stack.up", "main", "run the whole stack locally (Ray, prefill + decode groups, router, HTTP)"),
    "pools": ("k2serve.worker.parallel.pools_cli", "main", "run the pool controller (a Ray driver) on a Ray cluster"),
    "chat": ("k2serve.router.chat", "main", "send one chat request; print thinking, tool calls and answer"),
    "agent": ("k2serve.router.agent", "main", "run a task with the demo tools; print thinking, calls, answer"),
    "quantize": ("k2serve.worker.quantize", "main", "bf16 HF checkpoint -> INT4 pack-quantized (K2 layout)"),
    "crd": ("k2serve.operator.crd", "main", "print the K2Deployment CRD YAML"),
    "operator": ("k2serve.operator.run", "main", "run the kopf operator"),
    "chains": ("k2serve.router.chains.cli", "main", "inspect durable reasoning chains"),
    "config": ("k2serve.config_example", "main", "print a serving config with every field and what it means"),
    "bench": ("k2serve.bench_cli", "main", "run a benchmark from bench/"),
    "download": ("k2serve.download", "main", "download a model (hf://ORG/NAME[@REV]) into a folder, once"),
    "plan": ("k2serve.plan_cli", "main", "capacity plan: per-GPU bytes, KV budget, fit (no cluster needed)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: k2serve [--debug] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`k2serve COMMAND --help` describes a command's arguments. --debug (or K2SERVE_DEBUG=1) shows a",
              "traceback for errors that are otherwise reported in one line."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"k2serve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        result = getattr(importlib.import_module(module), func)(rest)
    except UserError as e:
        if debug:
            raise
        print(f"k2serve {name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
