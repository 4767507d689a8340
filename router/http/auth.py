"""Bearer API keys over HTTP (the policy: router/api_keys.py): every API route needs a key when keys are set."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request

from k2serve.config import RequestLimits
from k2serve.router.api_keys import APIKeys
from k2serve.router.http.errors import APIError
from k2serve.router.quotas import KeyLimits


def request_tenant(request: Request) -> str:
    """The tenant `bearer_guard` admitted this request as."""
    return request.state.tenant


def request_key_limits(request: Request) -> KeyLimits | None:
    """The quota of the key `bearer_guard` admitted this request with (None: unlimited)."""
    return request.state.key_limits


def bearer_guard(keys: APIKeys, defaults: RequestLimits) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that raises 401 unless the request carries `Authorization: Bearer <key>`; the key's
    tenant goes to `request.state.tenant`, its quota (router/quotas.py) to `request.state.key_limits`."""

    async def guard(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        credential = given.strip() if scheme.lower() == "bearer" else None
        tenant = keys.tenant(credential)
        if tenant is None:
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        request.state.tenant = tenant
        request.state.key_limits = keys.limits(credential, defaults)

    return guard
