"""The API-key policy of every client-facing surface (HTTP and the router's gRPC): with `router.api_keys_file` set,
a call must carry `Authorization: Bearer <key>` with one of its keys. Keys are held and compared as sha256 digests
(`hmac.compare_digest`, every key, so timing says nothing about which or how much matched). The file is re-read
when it changes (a rotated Kubernetes Secret takes effect without a restart). A key's tenant — who owns the chains
it creates — is a digest of the key, never the key."""

from __future__ import annotations

import hashlib
import hmac

from k2serve.cluster_auth import digest
from k2serve.watched_file import WatchedFile

OPEN_TENANT = ""  # every chain created while the API is open


def _parse_keys(text: str) -> frozenset[bytes]:
    """One key per line; blank lines and `#` comments skipped."""
    keys = frozenset(digest(s) for line in text.splitlines() if (s := line.strip()) and not s.startswith("#"))
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

    def tenant(self, credential: str | None) -> str | None:
        """The tenant of a bearer credential; None: refused (missing or not a key). Open API: OPEN_TENANT."""
        if self._file is None:
            return OPEN_TENANT
        if not credential:
            return None
        given = digest(credential)
        matched = False
        for key in self._file.value():
            matched |= hmac.compare_digest(given, key)
        return "key-" + hashlib.sha256(b"k2serve-tenant:" + given).hexdigest()[:32] if matched else None
