"""All-or-nothing output folders: every writer stages next to the target and renames into place.

``staged_dir`` is the one way a command or library call writes an output folder (a pruned model, an
adapter, a merge, a bundle): on an error nothing partial is left at the target path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["check_output_dir", "folder_problem", "staged_dir"]


def folder_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot become a folder, or None: the rest of a sentence that starts with the path
    (``"is a file, not a folder"``, ``"is a link to nothing"``, ``"cannot be created: '/x' is a file, not a
    folder"``, ``"cannot be created: '/x' is not writable"``). Nothing is created."""
    p = Path(path).expanduser()
    if p.is_symlink() and not p.exists():
        return "is a link to nothing"
    if p.exists():
        return None if p.is_dir() else "is a file, not a folder"
    parent = p.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {str(parent)!r} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {str(parent)!r} is not writable"
    return None


def check_output_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse a file, a path that cannot become a folder (under a file, a dangling link, a read-only
    parent), or a non-empty folder unless ``overwrite`` — before any work is done."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} exists and is not a folder")
    problem = folder_problem(out)
    if problem is not None:
        raise FileExistsError(f"output {str(out)!r} {problem}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} exists and is not empty (pass overwrite=True / --overwrite)")
    return out


def default_permissions(folder: Path) -> None:
    """Give ``folder`` and everything under it the umask's default modes (0777 / 0666 minus the umask).

    ``mkdtemp`` creates the stage 0700 and atomic writers create files 0600; without this every staged
    output would land readable by its owner only.
    """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it gets the umask's default permissions and replaces
    ``path`` by rename, on error it is removed.

    Nothing partial is ever left at ``path``.
    """
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.stage-", dir=out.parent))
    old: Path | None = None
    try:
        yield stage
        default_permissions(stage)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
