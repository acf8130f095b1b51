"""Loaded by every Python process started with this folder on PYTHONPATH (tests/distributed/test_train_launch.py).

In a process that a launcher started (``RANK`` is set) it installs an audit hook (PEP 578) that records every
file-system write under ``$ADAPTERLAB_AUDIT_WATCH`` — opens for writing, mkdir, rename/replace, remove, rmdir,
rmtree, mkdtemp, chmod, links — to ``$ADAPTERLAB_AUDIT_DIR/rank<RANK>.jsonl``, one JSON line per event, so a
test can prove which rank wrote what. ``$ADAPTERLAB_AUDIT_FAIL=RANK:TEXT`` makes that rank's first write-open
of a path containing TEXT fail with ENOSPC ("No space left on device"), a real OSError at that point of the run.
Without ``RANK`` or ``ADAPTERLAB_AUDIT_DIR`` (the launcher itself, any other process) it does nothing.
"""

from __future__ import annotations

import errno
import json
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
EVENTS = {
    "os.mkdir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.copytree",
    "shutil.move",
    "tempfile.mkdtemp",
    "tempfile.mkstemp",
    "os.chmod",
    "os.link",
    "os.symlink",
    "os.truncate",
}


def _install() -> None:
    rank = os.environ.get("RANK")
    folder = os.environ.get("ADAPTERLAB_AUDIT_DIR")
    watch = os.environ.get("ADAPTERLAB_AUDIT_WATCH")
    if rank is None or not folder or not watch:
        return
    watch = os.path.abspath(watch)
    log = open(os.path.join(folder, f"rank{rank}.jsonl"), "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    fail_rank, _, fail_text = os.environ.get("ADAPTERLAB_AUDIT_FAIL", "").partition(":")
    state = {"failed": False}

    def watched(arg: object) -> str | None:
        if isinstance(arg, bytes):
            arg = os.fsdecode(arg)
        if not isinstance(arg, str):
            return None
        path = os.path.abspath(arg)
        return path if path == watch or path.startswith(watch + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if not writes:
                return
            paths = [watched(path)]
        elif event in EVENTS:
            paths = [watched(a) for a in args[:2]]
        else:
            return
        hits = [p for p in paths if p is not None]
        if not hits:
            return
        log.write(json.dumps({"event": event, "paths": hits}) + "\n")
        if event == "open" and rank == fail_rank and fail_text and not state["failed"] and fail_text in hits[0]:
            state["failed"] = True
            raise OSError(errno.ENOSPC, "No space left on device (injected by the test)", hits[0])

    sys.addaudithook(hook)


_install()
