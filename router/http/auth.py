"""Bearer API keys: when `router.api_keys_file` is set every API route needs one of its keys."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import Request

from k2serve.router.http.errors import APIError


def load_api_keys(path: str | None) -> frozenset[str] | None:
    """One key per line; blank lines and `#` comments skipped. None: no file configured, the API is open."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"router.api_keys_file {path}: cannot read: {e}") from e
    keys = frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))
    if not keys:
        raise ValueError(f"router.api_keys_file {path}: holds no keys (one per line)")
    return keys


def bearer_guard(keys: frozenset[str] | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that raises 401 unless the request carries `Authorization: Bearer <key>`."""

    async def guard(request: Request) -> None:
        if keys is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Compare against every key in constant time so timing does not reveal a key prefix.
        matched = [hmac.compare_digest(given.strip().encode(), k.encode()) for k in keys]
        if scheme.lower() != "bearer" or not any(matched):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return guard
