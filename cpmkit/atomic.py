"""Write an artifact (file or folder) under a temporary name beside its destination and rename it into
place only when complete, so a failed or killed run never leaves anything that looks finished.

Temporary names are ``.<name>.<random>.partial``. A run removes the partials an earlier, killed run left
for the same destination before it starts. Any OSError while writing (a full disk, a read-only file
system, no permission) becomes one CpmkitError line naming the file and the reason, after the partial is
removed; with a ``size_hint`` a disk that is already too small is refused before anything is written.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cpmkit.errors import CpmkitError

MIB = 1 << 20


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def refuse_existing(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        raise CpmkitError(f"{dest}: already exists; choose another output or pass --overwrite")


def remove_partials(folder: Path, names: list[str]) -> None:
    """Temporary files and folders a killed run left in ``folder`` for outputs named ``names``."""
    for name in names:
        for leftover in folder.glob(f".{name}.*.partial"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def check_free_space(dest: Path, size_hint: int | None) -> None:
    """Refuse before writing when the disk holding ``dest`` has less free space than ``size_hint`` bytes."""
    if not size_hint:
        return
    free = shutil.disk_usage(dest.parent).free
    if free < size_hint:
        raise CpmkitError(f"{dest}: needs about {size_hint / MIB:,.1f} MiB but {dest.parent} has "
                          f"{free / MIB:,.1f} MiB free; nothing was written")


def _describe(e: OSError, dest: Path, size_hint: int | None) -> str:
    where = e.filename or dest
    reason = e.strerror or str(e)
    need = f" (the output needs about {size_hint / MIB:,.1f} MiB)" if size_hint and e.errno == errno.ENOSPC else ""
    return f"{where}: cannot write: {reason}{need}; nothing was left behind"


@contextmanager
def _writing(dest: Path, size_hint: int | None) -> Iterator[None]:
    """Turn an OSError of the body into one line naming the file."""
    try:
        yield
    except OSError as e:
        raise CpmkitError(_describe(e, dest, size_hint)) from None


def _prepare(dest: Path, overwrite: bool, size_hint: int | None) -> None:
    refuse_existing(dest, overwrite)
    with _writing(dest, size_hint):
        dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.parent.is_dir():
        raise CpmkitError(f"{dest.parent}: is not a folder")
    remove_partials(dest.parent, [dest.name])
    check_free_space(dest, size_hint)


@contextmanager
def atomic_dir(dest: Path, *, overwrite: bool = False, size_hint: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``dest``; on success it becomes ``dest``."""
    _prepare(dest, overwrite, size_hint)
    with _writing(dest, size_hint):
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        with _writing(dest, size_hint):
            tmp.chmod(0o777 & ~_current_umask())  # mkdtemp makes 0700; a finished artifact gets ordinary permissions
            yield tmp
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(dest: Path, *, overwrite: bool = False, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is renamed to ``dest``."""
    if dest.is_dir():
        raise CpmkitError(f"{dest}: is a folder; give a file name for the output")
    _prepare(dest, overwrite, size_hint)
    with _writing(dest, size_hint):
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with _writing(dest, size_hint):
            tmp.chmod(0o666 & ~_current_umask())  # mkstemp makes 0600
            yield tmp
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
