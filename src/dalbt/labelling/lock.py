"""The query lock of a labelling project: one query at a time, across processes."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from dalbt.errors import DalbtError


class QueryLock:
    """An exclusive ``flock`` on a project's ``query.lock`` file, released by :meth:`release`,
    on exit of a ``with`` block, or by the operating system when the process dies.

    Raises:
        DalbtError: If another query holds it.
    """

    def __init__(self, path: Path) -> None:
        self._file: Any = open(path, "w")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._file.close()
            self._file = None
            raise DalbtError(f"another query is already running on {path.parent}; wait for it "
                             "to finish") from exc

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> QueryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_held(path: Path) -> bool:
    """Whether some process holds the ``flock`` on ``path`` right now (False if no such file)."""
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


__all__ = ["QueryLock", "lock_held"]
