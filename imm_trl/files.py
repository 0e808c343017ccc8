"""Atomic file and directory writes: a reader (or a resumed run) sees the old version or the new
one, never half of either, and a killed writer leaves nothing that a later run mistakes for data.

Every directory a run writes (iteration checkpoints, the sampler's model copy, merged
checkpoints, the final model) is built in a staging directory beside its destination, whose
name carries the writer's pid, and handed to `publish_directory`; `remove_stale_staging` deletes
the staging directories of writers that no longer run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGING_MARKER = ".staging-"


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, then the directories themselves."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def write_atomically(path: Path, write: Callable[[Path], None], *, fsync: bool = True) -> None:
    """Call `write(temporary path)` next to `path`, flush it, then rename it into place."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        if fsync:
            fsync_path(Path(temporary))
        os.replace(temporary, path)
        if fsync:
            fsync_path(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2)))


def staging_prefix(final: Path) -> str:
    return f".{final.name}{STAGING_MARKER}"


@contextmanager
def staging_directory(final: Path):
    """A fresh directory beside `final` to build it in; removed if the block fails. Publish it
    with `publish_directory` inside the block."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{staging_prefix(final)}{os.getpid()}-", dir=final.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_directory(staging: Path, final: Path, *, fsync: bool = True) -> None:
    """Put the finished `staging` directory at `final`, replacing what was there.

    Order: flush the new files; rename the old `final` aside; rename `staging` into place;
    flush the parent directory; only then delete the old one. A kill at any point leaves either
    the old or the new directory at `final` (or, between the two renames, the old one aside
    under a staging name, which `remove_stale_staging` cleans and a resume never reads).
    """
    if fsync:
        fsync_tree(staging)
    staging.chmod(0o755)
    retired = None
    if final.exists():
        retired = final.parent / f"{staging_prefix(final)}{os.getpid()}-retired"
        shutil.rmtree(retired, ignore_errors=True)
        final.rename(retired)
    staging.rename(final)
    if fsync:
        fsync_path(final.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(directory: Path) -> list[Path]:
    """Delete the staging directories under `directory` whose writer no longer runs; returns
    what it deleted."""
    removed = []
    if not directory.is_dir():
        return removed
    for candidate in directory.iterdir():
        if not candidate.name.startswith(".") or STAGING_MARKER not in candidate.name:
            continue
        pid_text = candidate.name.split(STAGING_MARKER, 1)[1].split("-", 1)[0]
        # Called before this process stages anything, so a directory under its own pid is stale
        # too (pids are reused across container restarts).
        if pid_text.isdigit() and (int(pid_text) == os.getpid() or not process_alive(int(pid_text))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed
