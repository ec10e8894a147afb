"""Atomic file and folder output: nothing half-written is left behind, nothing a user had is lost."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import HfEffllmError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename.

    Args:
        path: destination file; its parent folder is created if needed.
        text: the content (UTF-8).

    Returns:
        The destination path.

    Example:
        >>> atomic_write_text("/tmp/x.txt", "hello")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, arg_name: str = "output") -> Path:
    """Check that ``path`` may be written as an output folder.

    Refuses a folder that exists and is not empty unless ``overwrite`` is set, and a path that is a file.

    Raises:
        HfEffllmError: naming ``arg_name`` and the path, and saying what would work.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HfEffllmError(f"{arg_name}={str(path)!r} is a file, not a folder; give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise HfEffllmError(
            f"{arg_name}={str(path)!r} exists and is not empty; choose another folder or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False, arg_name: str = "output") -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it into place only if the block succeeds.

    On error the temporary folder is removed and ``path`` is untouched. With ``overwrite`` an existing
    folder is replaced only after the new one is complete.

    Example:
        >>> with atomic_dir("/tmp/out", overwrite=True) as tmp:  # doctest: +SKIP
        ...     (tmp / "results.json").write_text("{}")
    """
    path = prepare_output_dir(path, overwrite=overwrite, arg_name=arg_name).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if path.exists():
        backup = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, backup)
    try:
        os.replace(tmp, path)
    except BaseException:
        if backup is not None:
            os.replace(backup, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
