"""Files written so that nothing is lost or half-written: every CSV, checkpoint and figure of the lab goes
through ``atomic_path``, and a command checks its output folders (``prepare_output_dir``) before any compute.
"""
from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

from raclora.errors import ConfigError, OutputError

# the errors of a write that the disk refuses: full, over quota, file too large, read-only
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_TMP = re.compile(r"^.+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")  # <name>.<pid of the writer>.<random>.tmp


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    The one way this project writes files (CSVs, checkpoints, figures): a reader sees the old file
    or the new one, never half of one, whatever interrupts the write. The temporary name carries
    the writer's process id, so that clean_stale_tmp can tell a killed writer's leftover from a
    file another live process is writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in NO_ROOM:  # not the disk's answer to a write (a source file that cannot be read, ...)
            raise
        raise write_error(path, e, _size(tmp), at_least=True) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (str: UTF-8) to ``path`` through atomic_path: the old file is kept whatever happens, and a
    file that cannot be written (disk full, quota, permissions) is an OutputError in one line that names it and
    the bytes it needed. What the suite writes (CSVs, checkpoints, figures) is made in memory first, so that
    its size is known and a failing writer (torch's zip writer, matplotlib) never meets the full disk."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # a full disk shows here at the latest, not after the rename
        except OSError as e:
            raise write_error(path, e, len(data)) from None


def atomic_write_via(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """atomic_write of what ``write(file)`` writes into an in-memory binary file: a writer that takes a file
    object (``torch.save(obj, f)``, ``fig.savefig(f, format="png")``, json) without meeting the disk."""
    buffer = io.BytesIO()
    write(buffer)
    atomic_write(path, buffer.getvalue())


def write_error(path: str | os.PathLike, e: OSError, needed: int | None, at_least: bool = False) -> OutputError:
    """OutputError for ``path`` that ``e`` stopped: which file, why, the bytes it needed (``needed``; None when
    not known) against what its disk has free, and that the old file is kept."""
    path = Path(path)
    free = _free(path.parent)
    need = f"it needs {'more than ' if at_least else ''}{_bytes(needed)}" if needed else "its size is not known"
    space = f"; {need}, and {_bytes(free)} are free there" if free is not None else ""
    kept = "the previous file is kept" if path.exists() else "nothing was written"
    return OutputError(f"could not write {path} ({e.strerror or type(e).__name__}){space}; {kept}; free some "
                       f"space or give another folder, then run the same command again")


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path) or None
    except OSError:
        return None


def _free(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _bytes(n: int) -> str:
    for unit, size in (("GB", 2 ** 30), ("MB", 2 ** 20), ("kB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def clean_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed mid-write (SIGKILL, power loss) left in ``folder``:
    those whose writer process no longer exists, and untagged ones (older versions' names). Returns them. A
    temporary folder named the same way (a TensorBoard run being written, engine/tracking.py) goes whole."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for f in folder.glob("*.tmp"):
        m = _TMP.match(f.name)
        if m and _alive(int(m.group(1))):
            continue
        try:
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
            removed.append(f)
        except FileNotFoundError:  # its writer finished and renamed it meanwhile
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # a process we may not signal is alive; an absurd pid is not ours to judge
    return True


_SYSTEM_DIRS = ("/proc", "/sys", "/dev")


def prepare_output_dir(field: str, path: str) -> Path:
    """Check an output folder setting before any compute: not empty, not a system folder, not a file,
    creatable and writable. Creates it; returns it. ConfigError in one line otherwise."""
    if not str(path).strip():
        raise ConfigError(f"{field} is empty; give a folder to write into, e.g. --{field} ./"
                          f"{'results' if 'results' in field else 'plots'}")
    if "\x00" in str(path):
        raise ConfigError(f"{field} {str(path)!r} holds a NUL byte, which no path may hold")
    p = Path(path).expanduser()
    real = os.path.realpath(p)
    system = next((d for d in _SYSTEM_DIRS if real == d or real.startswith(d + "/")), None)
    if system:
        raise ConfigError(f"{field} {str(path)!r} is under {system}, a system folder; give a folder of your own")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{field} {str(path)!r} is a file, not a folder; give a folder (it is created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{field} {str(path)!r} cannot be written ({type(e).__name__}: {e.strerror or e}); "
                          f"give a writable folder") from None
    return p
