"""schemathesis against the HTTP front's own OpenAPI document, over a live server and a real core: whatever
the generated requests hold, no 5xx and no crash; the error bodies and JSON answers match the document."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import response_schema_conformance

from k2serve.config import ChainStoreConfig, RouterConfig, ServingConfig
from k2serve.router.http.uvicorn_runner import BackgroundServer
from k2serve.stack.inproc import local_app

MAX_GENERATED = 4  # tokens; generation length is not what this test explores


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    config = ServingConfig(chain_store=ChainStoreConfig(sqlite_path=str(tmp / "chains.sqlite3")),
                           router=RouterConfig(aggregated=True))
    with BackgroundServer(lambda: local_app(config)) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(live: str) -> Any:
    return schemathesis.openapi.from_url(f"{live}/openapi.json")


@pytest.fixture(scope="module")
def valid_requests_schema(live: str) -> Any:
    """Only schema-valid requests: most of them get through validation and generate."""
    config = SchemathesisConfig()
    config.projects.default.generation.update(modes=[GenerationMode.POSITIVE])
    return schemathesis.openapi.from_url(f"{live}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")
valid_schema = schemathesis.pytest.from_fixture("valid_requests_schema").include(path_regex="completions$")


def _cap_generation(body: Any) -> None:
    """Valid token limits above MAX_GENERATED (or none, meaning the whole context) become MAX_GENERATED;
    invalid ones stay, they are what the 4xx paths are for."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > MAX_GENERATED):
            body[key] = MAX_GENERATED


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, live: str) -> None:
    _cap_generation(case.body)
    case.call_and_validate(base_url=live, checks=[not_a_server_error, response_schema_conformance], timeout=30)


@valid_schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_valid_generation_requests(case: Any, live: str) -> None:
    # Random model names and chain ids are 404s before generation (covered above): pin them so these generate.
    case.headers = {}
    if isinstance(case.body, dict):
        case.body |= {"model": "tiny-k2", "chain_id": None}
    _cap_generation(case.body)
    case.call_and_validate(base_url=live, checks=[not_a_server_error, response_schema_conformance], timeout=30)


def test_the_document_covers_every_route(live: str) -> None:
    paths = set(httpx.get(f"{live}/openapi.json").json()["paths"])
    assert paths == {"/healthz", "/readyz", "/metrics", "/v1/chat/completions", "/v1/completions", "/v1/models",
                     "/v1/chains/{chain_id}", "/v1/chains/{chain_id}/cancel", "/v1/chains/{chain_id}/stream"}
