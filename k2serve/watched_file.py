"""A small secret file (a token, a list of API keys — a Kubernetes Secret mounts as one) read at start and
re-read when it changes, so a secret rotates without a restart."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class WatchedFile(Generic[T]):
    """`value()` is `parse(text)` of the file as it is now. A stat per call notices a change (Kubernetes swaps a
    Secret's files by renaming a symlink, so inode and mtime change); a file that became unreadable or invalid
    keeps the last good value (a rotation half-written must not lock everyone out)."""

    path: str
    parse: Callable[[str], T]
    _stamp: tuple[int, int, int] | None = None
    _value: T | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read: {e}") from e
        self._value = self.parse(text)  # a bad file at start is an error, not a silent default
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def value(self) -> T:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            with self._lock:
                try:
                    self._value = self.parse(Path(self.path).read_text(encoding="utf-8"))
                    self._stamp = stamp
                except (OSError, ValueError):
                    pass  # keep the last good value; the next call tries again
        assert self._value is not None
        return self._value
