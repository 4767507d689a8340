"""The API-key policy of every client-facing surface (HTTP and the router's gRPC): with `router.api_keys_file` set,
a call must carry `Authorization: Bearer <key>` with one of its keys. Keys are held and compared as sha256 digests
(`hmac.compare_digest`, every key, so timing says nothing about which or how much matched). The file is re-read
when it changes (a rotated Kubernetes Secret takes effect without a restart). A key's tenant — who owns the chains
it creates — is a digest of the key, never the key.

A line may give the key its own quota after the key: `<key> max_concurrent=4 tokens_per_minute=20000` (either or
both; router/quotas.py); a key without them gets `router.limits`' defaults."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from k2serve.cluster_auth import digest
from k2serve.config import RequestLimits
from k2serve.router.quotas import KeyLimits
from k2serve.watched_file import WatchedFile

OPEN_TENANT = ""  # every chain created while the API is open


_QUOTA_FIELDS = frozenset(f.name for f in dataclasses.fields(KeyLimits))
Overrides = dict[str, int]


def _parse_line(line: str) -> tuple[bytes, Overrides]:
    key, *options = line.split()
    overrides: Overrides = {}
    for option in options:
        name, _, value = option.partition("=")
        if name not in _QUOTA_FIELDS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"has an option {name!r} that is not one of {sorted(_QUOTA_FIELDS)}=<positive int>")
        overrides[name] = int(value)
    return digest(key), overrides


def _parse_keys(text: str) -> dict[bytes, Overrides]:
    """One key per line (optionally followed by its quota options); blank lines and `#` comments skipped."""
    keys = dict(_parse_line(s) for line in text.splitlines() if (s := line.strip()) and not s.startswith("#"))
    if not keys:
        raise ValueError("holds no keys (one per line)")
    return keys


class APIKeys:
    def __init__(self, path: str | None) -> None:
        """ValueError if `path` is set but unreadable or holds no key. None: the API is open."""
        try:
            self._file = WatchedFile(path, _parse_keys) if path is not None else None
        except ValueError as e:
            raise ValueError(f"router.api_keys_file {e}") from e

    @property
    def open(self) -> bool:
        return self._file is None

    def _match(self, credential: str | None) -> tuple[bytes, Overrides] | None:
        """The credential's digest and quota options if it is a key (every key compared, in constant time)."""
        assert self._file is not None
        if not credential:
            return None
        given = digest(credential)
        found: tuple[bytes, Overrides] | None = None
        for key, overrides in self._file.value().items():
            if hmac.compare_digest(given, key):
                found = (given, overrides)
        return found

    def tenant(self, credential: str | None) -> str | None:
        """The tenant of a bearer credential; None: refused (missing or not a key). Open API: OPEN_TENANT."""
        if self._file is None:
            return OPEN_TENANT
        found = self._match(credential)
        return "key-" + hashlib.sha256(b"k2serve-tenant:" + found[0]).hexdigest()[:32] if found else None

    def limits(self, credential: str | None, defaults: RequestLimits) -> KeyLimits | None:
        """The credential's quota: its own options over `defaults`; None (unlimited) for an open API or no key."""
        if self._file is None:
            return None
        found = self._match(credential)
        if found is None:
            return None
        base = KeyLimits(max_concurrent=defaults.max_concurrent_per_key,
                         tokens_per_minute=defaults.tokens_per_minute_per_key)
        return dataclasses.replace(base, **found[1])
