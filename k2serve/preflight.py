"""Checks that run before slow work starts (Ray, model loading), so a user's mistake is reported in a second as
one line that says what to do, not as a traceback after the stack came up. (Joining a Ray cluster checks its
address the same way: k2serve/ray_join.py.)"""

from __future__ import annotations

import errno
import socket

from k2serve.errors import UserError


def ensure_port_free(host: str, port: int, what: str, flag: str) -> None:
    """Binds and releases (host, port); port 0 (any free port) always passes."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"{what} port {port} on {host} is already in use (another `k2serve up`?): stop "
                                f"that process or choose another with {flag} (0 picks a free one)") from e
            raise UserError(f"cannot listen on {host}:{port} for {what}: {e.strerror or e}") from e
