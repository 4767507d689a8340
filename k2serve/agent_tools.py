"""The built-in demo tools of `builtin:tiny-k2-agent` and the agent loop's context window: one source for the
training corpus (which renders what the model must learn to call) and for `k2serve agent` (which executes the
calls the model emits), so the two always agree on schemas, results and error texts.

All tools are deterministic and local: `weather` invents the weather of any well-formed city name from a hash,
`next` walks a chain of ids derived from a seed, so held-out tasks need no data files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any

# Schemas as short as the model needs (the declaration is part of every prompt). The file is also what
# `k2serve chat --tools k2serve/demo_tools.json` sends.
DEMO_TOOLS: list[dict[str, Any]] = json.loads(
    resources.files("k2serve").joinpath("demo_tools.json").read_text(encoding="utf-8"))

CONDITIONS = ("sunny", "rainy", "windy", "cloudy", "snowy", "foggy")
# unit -> (target unit, factor); the conversions the demo knows.
CONVERSIONS: dict[str, tuple[str, Decimal]] = {
    "mi": ("km", Decimal("1.609344")), "km": ("mi", Decimal("0.621371")), "kg": ("lb", Decimal("2.204623")),
    "lb": ("kg", Decimal("0.453592")), "in": ("cm", Decimal("2.54")), "cm": ("in", Decimal("0.393701")),
}
CITY_RE = re.compile(r"[A-Z][a-z]{2,11}")
CHAIN_ID_RE = re.compile(r"[a-z0-9]{4}")
END_PREFIX = "END "
MAX_EXPRESSION = 64
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
CENT = Decimal("0.01")


class ToolError(ValueError):
    """A call the tool refuses; its message is the tool's result text, which the model reads and acts on."""


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def format_number(value: Decimal) -> str:
    """Integers plainly, other values to two decimals (what every demo tool prints)."""
    if value == value.to_integral_value():
        return str(int(value))
    return str(value.quantize(CENT))


def _evaluate(node: ast.AST) -> Decimal:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Decimal(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ToolError("error: division by zero")
        return _OPS[type(node.op)](left, right)
    raise ToolError("error: only numbers and + - * / are allowed")


def calculator(expression: str) -> str:
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"error: expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"error: cannot parse {expression!r}") from None
    try:
        return format_number(_evaluate(tree.body))
    except InvalidOperation:
        raise ToolError("error: number out of range") from None


def weather(city: str) -> str:
    if not CITY_RE.fullmatch(city):
        if CITY_RE.fullmatch(city.capitalize()):
            raise ToolError(f"error: unknown city {city}; did you mean {city.capitalize()}?")
        raise ToolError(f"error: unknown city {city}")
    h = _digest("weather", city)
    return f"{city}: {h % 41 - 10} C, {CONDITIONS[(h >> 8) % len(CONDITIONS)]}"


def convert(value: str, to: str) -> str:
    number, _, unit = value.partition(" ")
    if unit not in CONVERSIONS or CONVERSIONS[unit][0] != to:
        raise ToolError(f"error: cannot convert {value} to {to}")
    try:
        amount = Decimal(number)
    except InvalidOperation:
        raise ToolError(f"error: {number!r} is not a number") from None
    return format_number((amount * CONVERSIONS[unit][1]).quantize(CENT))


def chain_id(seed: str, link: int) -> str:
    """The id of `link` (0 = the start) in the chain named by `seed`."""
    h = _digest("chain", seed, str(link))
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(alphabet[(h >> (6 * i)) % len(alphabet)] for i in range(4))


@dataclass(frozen=True)
class Chain:
    """`next(id)` walks start -> ... in `links` calls; the last call returns `END <end value>`."""
    seed: str
    links: int

    @property
    def start(self) -> str:
        return chain_id(self.seed, 0)

    @property
    def end_value(self) -> str:
        return chain_id(self.seed, self.links)

    def ids(self) -> list[str]:
        return [chain_id(self.seed, i) for i in range(self.links + 1)]

    def next(self, current: str) -> str:
        ids = self.ids()
        if current not in ids[:-1]:
            raise ToolError(f"error: unknown id {current}")
        at = ids.index(current) + 1
        return END_PREFIX + ids[at] if at == self.links else ids[at]


class DemoTools:
    """Executes the demo tools; `chain` is the chain `next` walks (a task sets it up, as a real tool has state)."""

    def __init__(self, chain: Chain | None = None) -> None:
        self.chain = chain

    def call(self, name: str, arguments: str) -> str:
        """The result text of one call; a bad call gets an `error: ...` text, never an exception."""
        try:
            args = json.loads(arguments)
        except json.JSONDecodeError:
            return f"error: arguments are not JSON: {arguments[:80]}"
        if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
            return "error: arguments must be an object of strings"
        try:
            if name == "calculator" and set(args) == {"expression"}:
                return calculator(args["expression"])
            if name == "weather" and set(args) == {"city"}:
                return weather(args["city"])
            if name == "convert" and set(args) == {"value", "to"}:
                return convert(args["value"], args["to"])
            if name == "next" and set(args) == {"id"}:
                if self.chain is None:
                    return "error: no chain is set up"
                return self.chain.next(args["id"])
        except ToolError as e:
            return str(e)
        return f"error: no tool {name} taking {sorted(args)}"


# The agent loop's context management for long chains: the task and the most recent rounds (one assistant turn
# plus its tool results) are kept; once more than WINDOW_MAX rounds pile up, the oldest are dropped down to
# WINDOW_KEEP. Cutting in steps (not one round per turn) keeps each prompt an extension of the previous one
# between cuts, so the prefix cache serves it.
WINDOW_MAX = 3
WINDOW_KEEP = 1


def windowed(rounds: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """The rounds the next prompt keeps."""
    return rounds[-WINDOW_KEEP:] if len(rounds) > WINDOW_MAX else rounds
