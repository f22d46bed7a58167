"""Atomic writes: a file or a whole folder appears complete or not at all.

Every file lorakit writes goes through here. A write goes to a temporary sibling named
``.<name>.tmp-<pid>-<random>`` and is renamed into place; a folder is swapped in with one
``renameat2(RENAME_EXCHANGE)`` where the kernel offers it (Linux), so a kill at any instant leaves the
old folder or the new one, never a mix of both. Temporaries left by a killed process (its pid is gone)
are removed by the next write to the same place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "remove_stale_temporaries", "replace_directory", "staged_directory"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings of `target` whose process is gone;
    if a killed swap left `target` missing but its previous version aside, put that back.

    Args:
        target: the file or folder whose leftovers are cleaned up; nothing happens if its parent folder does not exist.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    for kind in ("old", "tmp"):  # an old version first: it may be the only complete copy
        for path in sorted(target.parent.glob(f".{target.name}.{kind}-*")):
            pid = path.name[len(f".{target.name}.{kind}-"):].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not target.exists():
                os.replace(path, target)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)``, then rename the temporary file onto `path` (parents are created).

    The temporary is synced to disk before the rename and deleted if `write` fails, so `path` holds the old
    content or the new one, never a mix.

    Args:
        path: the file to write.
        write: writes the complete content to the temporary path it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = _temporary_name(path)
    try:
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically.

    Args:
        path: the file to write (parents are created).
        text: its whole content.
    """
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the platform cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the complete folder `staging` at `target` in one step; the previous `target` is deleted.

    Args:
        staging: the complete new folder, beside `target` (it is renamed, not copied, so it must be on the same file system).
        target: where it goes; it need not exist.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging)  # it now holds the previous version
        return
    aside = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(target, aside)  # a kill here leaves `aside`, which the next write puts back
    os.replace(staging, target)
    shutil.rmtree(aside)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it replaces `target` whole, on an
    error it is deleted and `target` is untouched.

    Args:
        target: the folder to write; its parent folders are created on entry.

    Yields:
        The empty staging folder (a `Path`) to fill.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    staging = _temporary_name(target)
    staging.mkdir()
    try:
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
