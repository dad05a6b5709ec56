"""The one way lorafit writes files and folders: build a temporary sibling, fsync, rename.

A reader never sees a half-written file or folder, and a crash, a full disk or a read-only target
leaves what was there before untouched: the old target is never deleted before the new one is
complete. Folders are swapped with two renames (old -> hidden backup, new -> target), then the
backup is removed.

A failed write raises `WriteError` (an OSError) whose message names the path and the reason, so
the command line can print it as one line.
"""

from __future__ import annotations

import json
import os
import shutil
import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """Writing `path` failed; nothing partial was left behind."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return str(exc) or type(exc).__name__


def _temp_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(target, _reason(exc)) from None


def write_file(target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Create or replace the file `target` with what `write(tmp_path)` writes."""
    target = Path(target)
    _make_parent(target)
    tmp = _temp_sibling(target, "tmp")
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(target, _reason(exc)) from None
        raise
    _fsync_dir(target.parent)
    return target


def write_text(target: str | os.PathLike, text: str) -> Path:
    return write_file(target, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(target: str | os.PathLike, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, default=str) + "\n")


def write_dir(
    target: str | os.PathLike, build: Callable[[Path], Any], keep_existing: bool = False
) -> Path:
    """Create or replace the folder `target` with what `build(tmp_folder)` puts in a fresh folder.

    With `keep_existing`, a `target` that exists by the time ours is complete (another process
    built the same thing) is kept and ours discarded: for caches, where any complete copy will do.
    """
    target = Path(target)
    _make_parent(target)
    tmp = _temp_sibling(target, "tmp")
    try:
        tmp.mkdir()
        build(tmp)
        _fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(target, _reason(exc)) from None
        raise
    if keep_existing and target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    old = _temp_sibling(target, "old") if target.exists() else None
    try:
        if old is not None:
            os.rename(target, old)
        os.rename(tmp, target)
    except OSError as exc:
        if keep_existing and old is None and target.exists():  # lost a race to an equal copy
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)  # put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(target, _reason(exc)) from None
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_dir(path: str | os.PathLike) -> None:
    """Delete the folder `path` so that no reader ever sees it half-deleted: it is first renamed
    to a hidden `.{name}.del-...` sibling (one atomic step), then that is deleted. A kill during
    the delete leaves only the sibling, which `remove_leftovers` deletes (never restores). A
    missing `path` is not an error."""
    path = Path(path)
    trash = _temp_sibling(path, "del")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise WriteError(path, f"cannot remove it: {_reason(exc)}") from None
    _fsync_dir(path.parent)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def write_files(
    folder: str | os.PathLike, writers: dict[str, Callable[[Path], Any]], remove: list[str] = ()
) -> Path:
    """Write several files of one folder as a unit as far as renames allow: each is first
    written complete under a temporary name, then all are renamed into place in the order of
    `writers` (put the file readers look for first, e.g. a config, last), and the `remove`d
    files go just before the last one. If anything fails, every file touched gets its previous
    content back. Other files in the folder are left alone."""
    folder = Path(folder)
    staged: dict[str, Path] = {}
    try:
        for file_name, write in writers.items():
            staged[file_name] = _stage(folder, file_name, write)
        _switch_in(folder, staged, list(remove))
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return folder


def _stage(folder: Path, file_name: str, write) -> Path:
    """`write` a complete, fsynced file under a temporary name beside `folder / file_name`."""
    staging = _temp_sibling(folder / file_name, "tmp")
    try:
        return write_file(staging, write)
    except WriteError as exc:  # name the file being saved, not the temporary one
        reason = str(exc).removeprefix(f"cannot write {staging}: ")
        raise WriteError(folder / file_name, reason) from None


def _switch_in(folder: Path, staged: dict[str, Path], remove: list[str]) -> None:
    """Rename the staged files into place in their order and delete `remove` (after the
    weights, before the config). On failure every file touched gets its previous content back
    (or is removed if it did not exist), and WriteError names the file that failed."""
    steps = list(staged)
    steps[-1:-1] = [n for n in remove if n not in staged]  # stale files go before the config
    backups: dict[str, Path | None] = {}
    failing = steps[0]
    try:
        for failing in steps:
            target = folder / failing
            backups[failing] = _backup(target)
            if failing in staged:
                os.replace(staged[failing], target)
            else:
                target.unlink(missing_ok=True)
    except BaseException as exc:
        for file_name, backup in reversed(backups.items()):
            target = folder / file_name
            try:
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink(missing_ok=True)
            except OSError:
                pass  # best effort: the error that matters is the one raised below
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise WriteError(folder / failing, reason) from None
        raise
    finally:
        for backup in backups.values():
            if backup is not None:
                backup.unlink(missing_ok=True)
    _fsync_dir(folder)


def _backup(target: Path) -> Path | None:
    """A second name for the current `target` (a hard link; a copy where links fail), so it can
    be put back; None when there is no such file."""
    if not target.is_file():
        return None
    backup = _temp_sibling(target, "old")
    try:
        os.link(target, backup)
    except OSError:
        shutil.copy2(target, backup)
    return backup


@contextlib.contextmanager
def replacing_dir(target: str | os.PathLike) -> Iterator[Path]:
    """For a folder that a long job must build in place (a training run writes paths that name
    its folder): the previous `target` is moved aside while the block runs, deleted when it
    succeeds, and put back when it fails (what the failed block left is removed)."""
    target = Path(target)
    _make_parent(target)
    old = _temp_sibling(target, "old") if target.exists() else None
    if old is not None:
        try:
            os.rename(target, old)
        except OSError as exc:
            raise WriteError(target, _reason(exc)) from None
    try:
        yield target
    except BaseException:
        remove_dir(target)
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        remove_dir(old)


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Clean up after a process killed in the middle of a write in `folder`: delete temporary
    siblings and folders `remove_dir` was deleting, and put back a previous version whose
    replacement never arrived (a kill between the two renames of `write_dir` leaves the old
    folder as the only copy)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        if not p.name.startswith("."):
            continue
        name, dot, rest = p.name[1:].rpartition(".")
        if ".old-" in p.name and dot and rest.startswith("old-") and not (folder / name).exists():
            os.rename(p, folder / name)
        elif ".tmp-" in p.name or ".old-" in p.name or ".del-" in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
