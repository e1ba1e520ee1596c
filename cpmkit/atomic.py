"""Write an artifact (file or folder) under a temporary name beside its destination and rename it into
place only when complete, so a failed or killed run never leaves anything that looks finished."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cpmkit.errors import CpmkitError


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def refuse_existing(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not overwrite:
        raise CpmkitError(f"{dest}: already exists; choose another output or pass --overwrite")


@contextmanager
def atomic_dir(dest: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``dest``; on success it becomes ``dest``."""
    refuse_existing(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    tmp.chmod(0o777 & ~_current_umask())  # mkdtemp makes 0700; a finished artifact gets ordinary permissions
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(dest: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is renamed to ``dest``."""
    refuse_existing(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_current_umask())  # mkstemp makes 0600
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
