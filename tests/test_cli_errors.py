"""What a person meets when something is wrong: one line that names the problem and what to do, no traceback,
and nothing slow started first (`k2serve --debug` shows the traceback)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from k2serve import cli
from k2serve.config import ConfigError, ServingConfig

# Each case runs as a user runs it: the installed command in a child process, from a neutral directory.
ERRORS_TIMEOUT_S = 120


def k2serve(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("K2SERVE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "k2serve.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=ERRORS_TIMEOUT_S)


def assert_user_error(proc: subprocess.CompletedProcess[str], *fragments: str, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chat_without_a_stack_names_the_url_and_how_to_start_one(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert_user_error(k2serve("chat", "hi", "--url", url, cwd=tmp_path), url, "k2serve up")


def test_up_with_a_missing_model_folder_fails_before_ray(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = k2serve("up", "--model", str(tmp_path / "nonexistent"), cwd=tmp_path)
    assert_user_error(proc, str(tmp_path / "nonexistent"), "no such model directory")
    assert "Ray" not in proc.stdout + proc.stderr and time.monotonic() - start < 60


def test_up_with_a_config_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "serving.yaml"
    bad.write_text("router:\n  http_port: 8000\n  host: [unclosed\nmodel:\n  source: x\n")
    assert_user_error(k2serve("up", "--config", str(bad), cwd=tmp_path), f"{bad}:", "not valid YAML")


def test_up_with_the_port_in_use_fails_before_ray(tmp_path: Path, busy_port: int) -> None:
    proc = k2serve("up", "--model", "builtin:tiny-k2", "--port", str(busy_port), cwd=tmp_path)
    assert_user_error(proc, f"port {busy_port}", "in use", "--port")
    assert "Ray" not in proc.stdout


def test_operator_without_credentials(tmp_path: Path) -> None:
    env = {"KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "KUBERNETES_SERVICE_HOST": ""}
    assert_user_error(k2serve("operator", cwd=tmp_path, env=env), "no Kubernetes credentials", "KUBECONFIG")


def test_pools_with_a_stale_ray_address_fails_fast(tmp_path: Path) -> None:
    port = closed_port()
    start = time.monotonic()
    proc = k2serve("pools", cwd=tmp_path, env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert_user_error(proc, f"127.0.0.1:{port}", "--local")
    assert time.monotonic() - start < 60


def test_chains_show_without_a_store_creates_none(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = k2serve("chains", "show", "abc", cwd=tmp_path, env={"K2SERVE_STATE_DIR": str(state)})
    assert_user_error(proc, "no chain store at", str(state / "chains.sqlite3"), code=1)  # as for a missing chain
    assert not state.exists() and list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    proc = k2serve("--debug", "chat", "hi", "--url", url, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr


# --- help texts: every subcommand describes itself in full sentences and every option says what it does


def parsers_of(name: str, monkeypatch: pytest.MonkeyPatch) -> list[argparse.ArgumentParser]:
    """The parser a subcommand builds (and its sub-parsers), captured where it parses its arguments."""
    seen: list[argparse.ArgumentParser] = []

    class Parsed(Exception):
        pass

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        seen.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module, func, _ = cli.COMMANDS[name]
    with pytest.raises(Parsed):
        getattr(__import__(module, fromlist=[func]), func)(["--help"])
    subs = [p for a in seen[0]._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    return seen + subs


@pytest.mark.parametrize("name", sorted(set(cli.COMMANDS) - {"bench"}))  # bench passes its arguments through
def test_help_texts_are_complete(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for parser in parsers_of(name, monkeypatch):
        description = (parser.description or "").strip()
        assert description and description[-1] in ".)", (parser.prog, description)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), (parser.prog, action.dest)


# --- config errors name the file and the line or field


@pytest.mark.parametrize(("name", "text", "where"), [
    ("c.yaml", "router:\n  http_port: 1\n   host: x\n", "c.yaml:3:"),
    ("c.json", '{"router": {"http_port": 1,}}', "c.json:1:"),
    ("c.yaml", "router:\n  http_port: -5\n", "router.http_port"),
    ("c.yaml", "- a\n- b\n", "a mapping"),
])
def test_config_errors_name_file_and_place(tmp_path: Path, name: str, text: str, where: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        ServingConfig.load(path)
    assert where in str(e.value) and str(path.parent) in str(e.value)
