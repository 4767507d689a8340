"""`k2serve chains`: inspect, delete and expire durable reasoning chains.

The store comes from --sqlite PATH or --redis URL, else from --config PATH (or $K2SERVE_CONFIG), else the
default SQLite file (in the state directory, as `k2serve up` writes it). Reading never creates a store.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from k2serve.config import ChainStoreConfig, ServingConfig
from k2serve.helptext import summary
from k2serve.router.chains.models import Chain, ChainSummary
from k2serve.router.chains.store import ChainStore, ChainStoreError, open_store


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--config", help="serving config (YAML or JSON); its chain_store section is used")
    where.add_argument("--sqlite", metavar="PATH", help="SQLite chain store file")
    where.add_argument("--redis", metavar="URL", help="Redis chain store, e.g. redis://host:6379/0")
    p = argparse.ArgumentParser(prog="k2serve chains", description=summary(__doc__))
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", parents=[common], help="a chain's turns and tool-call transcript (provenance)",
                        description="A chain's turns and tool-call transcript (provenance).")
    show.add_argument("chain_id", help="the chain's id (the X-K2-Chain-Id response header)")
    show.add_argument("--json", action="store_true", help="print the whole chain as JSON, tokens included")
    ls = sub.add_parser("list", parents=[common], help="chains, most recently updated first",
                        description="Chains, most recently updated first.")
    ls.add_argument("--limit", type=int, default=50, help="most chains to list (50)")
    rm = sub.add_parser("delete", parents=[common], help="delete a chain",
                        description="Delete a chain.")
    rm.add_argument("chain_id", help="the chain's id")
    purge = sub.add_parser("purge", parents=[common], help="delete chains untouched for longer than the retention TTL",
                        description="Delete chains untouched for longer than the retention TTL.")
    purge.add_argument("--ttl", type=float, help="seconds; default: chain_store.ttl_seconds of the config")
    return p


def _store_config(args: argparse.Namespace) -> ChainStoreConfig:
    if args.sqlite:
        # a path the user typed is relative to where they are, not to the state directory
        return ChainStoreConfig(backend="sqlite", sqlite_path=str(Path(args.sqlite).resolve()))
    if args.redis:
        return ChainStoreConfig(backend="redis", redis_url=args.redis)
    cfg = ServingConfig.load(args.config) if args.config else ServingConfig.from_env()
    return cfg.chain_store


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _summary_line(c: ChainSummary) -> str:
    owner = f"  leased by {c.owner}" if c.owner else ""
    return (
        f"{c.chain_id}  {c.status:<9}  turns={c.n_turns}  tool_calls={c.n_tool_calls}  "
        f"updated {_when(c.updated_at)}{owner}"
    )


def format_chain(chain: Chain) -> str:
    """Turns in order; after each turn, the tool calls it made and the results the client sent back."""
    lines = [_summary_line(chain), f"created {_when(chain.created_at)}"]
    calls_by_turn: dict[int, list[str]] = {}
    for call in chain.tool_calls:
        result = "(no result yet)" if call.result is None else f"-> {call.result}"
        calls_by_turn.setdefault(call.turn, []).append(
            f"    [{call.turn}.{call.index}] {call.id} {call.name}({call.arguments}) {result}"
        )
    for turn in chain.turns:
        reason = f" ({turn.finish_reason})" if turn.finish_reason else ""
        lines.append(
            f"turn {turn.index}: {turn.status}{reason}  prompt={len(turn.prompt_tokens)} "
            f"generated={len(turn.generated)} tokens  sampling={json.dumps(turn.sampling)}  "
            f"started {_when(turn.created_at)}"
        )
        lines += calls_by_turn.get(turn.index, [])
    return "\n".join(lines)


def _run(store: ChainStore, args: argparse.Namespace, ttl_default: int) -> int:
    if args.command == "show":
        chain = store.get_chain(args.chain_id)
        print(chain.model_dump_json(indent=2) if args.json else format_chain(chain))
    elif args.command == "list":
        for c in store.list_chains(args.limit):
            print(_summary_line(c))
    elif args.command == "delete":
        if not store.delete_chain(args.chain_id):
            print(f"k2serve chains: no chain {args.chain_id!r}", file=sys.stderr)
            return 1
        print(f"deleted {args.chain_id}")
    else:
        ttl = ttl_default if args.ttl is None else args.ttl
        print(f"purged {store.purge_expired(ttl)} chains untouched for {ttl:g} s")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _store_config(args)
        with open_store(cfg, create=False) as store:
            return _run(store, args, cfg.ttl_seconds)
    except (ChainStoreError, ValueError) as e:
        print(f"k2serve chains: {e}", file=sys.stderr)
        return 1
