"""Crash-safe file writing: everything is written to a temporary name and renamed.

A reader therefore sees either the previous complete file or the new complete file,
never a half-written one. ``ENOSPC`` (disk full) becomes a :class:`UserError`; after any
failure the temporary file, and the folders created for it (when still empty), are removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dast.errors import UserError

TMP_MARK = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The temporary sibling used while ``path`` is being written."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    created = _make_parents(target.parent)
    tmp = temp_name(target)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        if fsync:
            _fsync_dir(target.parent)
    except OSError as exc:
        _discard(tmp, created)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"no space left on device while writing {target}") from exc
        raise
    except BaseException:
        _discard(tmp, created)
        raise


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors; return those created, deepest first."""
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _discard(tmp: Path, created: list[Path]) -> None:
    """After a failed write: remove the temporary file and the folders made for it, if empty."""
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (another writer uses it) or already gone
            break


def write_bytes(path: str | os.PathLike[str], data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text(path: str | os.PathLike[str], text: str, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | os.PathLike[str], obj: Any, fsync: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", fsync=fsync)


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None], fsync: bool = True) -> None:
    """Call ``writer(tmp_path)`` and rename the result onto ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        writer(tmp)


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files left by a crashed writer in ``folder``; return how many."""
    count = 0
    root = Path(folder)
    if not root.is_dir():
        return 0
    for p in root.rglob(f"*{TMP_MARK}*"):
        if p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                count += 1
    return count
