"""Atomic file writes: a crash never leaves a half-written file where a good one was."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from flm.errors import DiskFullError, UsageError

log = logging.getLogger("flm")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def atomic_path(dest, suffix: str = ""):
    """Yield a temporary path beside `dest`; on success fsync and rename it over `dest`.

    Works for files and directories (a Core ML `.mlpackage` is a directory). On error the
    temporary is removed and `dest` is untouched.
    """
    dest = Path(dest)
    output_folder(dest.parent)
    try:
        # the writer's pid in the name lets `sweep_temporaries` tell a dead writer's leftovers
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}-", suffix=".tmp" + suffix, dir=dest.parent)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise DiskFullError(dest, e.strerror or str(e)) from e
        raise
    os.close(fd)
    os.unlink(tmp)  # let the writer create a file or a directory there
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file() and dest.is_dir():
            output_file(dest)
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        replace(tmp, dest)
    except BaseException as e:
        remove(tmp)
        full = _no_space(e)
        if full is not None:  # a full disk: one clear error, not a traceback
            raise DiskFullError(dest, full.strerror or str(full)) from e
        raise


def output_folder(path, option: str = "", create: bool = True) -> Path:
    """`path` as a folder to write files into, created unless `create` is False (a writer that
    creates it with its first file, so a failed run leaves no empty folder); one clear error
    where a file is in the way of it or of a folder above it. `option` names the command-line
    option it came from."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{option + ' ' if option else ''}{path}: {blocker} is a file; expected a folder to write into",
                         example=f"{blocker.with_suffix('')}-out")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise DiskFullError(path, e.strerror or str(e)) from e
            raise
    return path


def output_file(path, option: str = "") -> Path:
    """`path` checked as the name of a file to write, before any work is done: one clear error
    where a folder has that name or a file is in the way of its folder. `option` as above."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option + ' ' if option else ''}{path} is a folder; expected the name of a file to write",
                         example=f"{path / path.name}.json")
    output_folder(path.parent, option, create=False)
    return path


_TEMPORARY = re.compile(r"^\..+\.(\d+)-[^.]+\.tmp")


def sweep_temporaries(folder) -> int:
    """Remove the temporaries of `atomic_path` writers that no longer run (killed with SIGKILL,
    say, which no `finally` survives) from `folder`; a live writer's are left alone. Returns
    how many were removed."""
    removed = 0
    for p in Path(folder).glob(".*.tmp*"):
        m = _TEMPORARY.match(p.name)
        if m and not _alive(int(m.group(1))):
            remove(p)
            removed += 1
    if removed:
        log.info("removed %d temporary file(s) left in %s by a writer that was killed", removed, folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _no_space(e: BaseException | None) -> OSError | None:
    """The ENOSPC-like OSError behind `e`, if any: writers such as torch.save raise their own
    error while cleaning up, with the OSError as its context."""
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return e
        e = e.__cause__ or e.__context__
    return None


def replace(src: Path, dest: Path) -> None:
    """Move `src` over `dest` (atomic for files; for directories old one goes after the new is in place)."""
    src, dest = Path(src), Path(dest)
    if src.is_dir() and dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(src, dest)
        remove(old)
    else:
        os.replace(src, dest)
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        dfd = os.open(dest.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def size_of(path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def log_written(path, started: float) -> None:
    """STYLE 6: every artefact written is logged with its path, size and time taken."""
    log.info("wrote %s (%.2f MB, %.1f s)", path, size_of(path) / 1e6, time.perf_counter() - started)
