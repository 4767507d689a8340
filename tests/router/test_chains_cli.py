"""`k2serve chains` (router/chains/cli.py) on both backends: show (the chain's provenance in order), list,
delete, purge."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2serve.router.chains import ChainStore
from k2serve.router.chains.cli import main as chains_cli
from k2serve.router.chains.redis_store import RedisChainStore
from k2serve.router.chains.sqlite_store import SqliteChainStore
from helpers.chains import REQUEST, SAMPLING


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_cli_show_list_delete_purge(backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    request: pytest.FixtureRequest) -> None:  # fmt: skip
    if backend == "sqlite":
        where = ["--sqlite", str(tmp_path / "c.sqlite3")]
        store: ChainStore = SqliteChainStore(where[1])
    else:
        url = request.getfixturevalue("redis_server").url
        config = tmp_path / "serving.yaml"
        config.write_text(f"chain_store:\n  backend: redis\n  redis_url: {url}\n")
        where = ["--config", str(config)]
        store = RedisChainStore(url)
    chain = store.create_chain("agent-1")
    for t in range(3):
        store.begin_turn(chain, REQUEST, SAMPLING, [1, 2])
        store.append_tokens(chain, t, 0, [5] * (t + 1))
        store.record_tool_calls(chain, t, [{"id": f"call_{t}", "name": "search", "arguments": f'{{"q": {t}}}'}])
        store.finish_turn(chain, t, "finished", "tool_calls")
        if t < 2:
            store.record_tool_result(chain, f"call_{t}", f"found {t}")
    store.close()

    assert chains_cli(["show", "agent-1", *where]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("agent-1  finished   turns=3  tool_calls=3  updated ")
    # Each turn, then the calls it made with the results sent back: the provenance of the chain, in order.
    transcript = [line.split("  sampling=")[0] for line in lines[2:]]
    assert transcript == [
        "turn 0: finished (tool_calls)  prompt=2 generated=1 tokens",
        '    [0.0] call_0 search({"q": 0}) -> found 0',
        "turn 1: finished (tool_calls)  prompt=2 generated=2 tokens",
        '    [1.0] call_1 search({"q": 1}) -> found 1',
        "turn 2: finished (tool_calls)  prompt=2 generated=3 tokens",
        '    [2.0] call_2 search({"q": 2}) (no result yet)',
    ]
    assert ' sampling={"seed": 1234, "temperature": 1.0, "top_p": 0.95}  started '  in lines[2]
    assert chains_cli(["show", "agent-1", "--json", *where]) == 0
    assert '"generated": [\n' in capsys.readouterr().out
    assert chains_cli(["list", *where]) == 0
    assert capsys.readouterr().out.startswith("agent-1  finished   turns=3  tool_calls=3")
    assert chains_cli(["purge", *where]) == 0
    assert capsys.readouterr().out == "purged 0 chains untouched for 604800 s\n"
    assert chains_cli(["purge", "--ttl", "0", *where]) == 0
    assert capsys.readouterr().out == "purged 1 chains untouched for 0 s\n"
    assert chains_cli(["show", "agent-1", *where]) == 1
    assert "no chain 'agent-1'" in capsys.readouterr().err
    assert chains_cli(["delete", "agent-1", *where]) == 1


def test_cli_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "c.sqlite3")
    with SqliteChainStore(path) as s:
        s.create_chain("gone")
    assert chains_cli(["delete", "gone", "--sqlite", path]) == 0
    assert capsys.readouterr().out == "deleted gone\n"
    assert chains_cli(["list", "--sqlite", path]) == 0
    assert capsys.readouterr().out == ""
