"""The one writer: a failed write leaves the old target and no temporary behind."""

import os
import shutil
from pathlib import Path

import pytest

from lorafit.atomic import (
    WriteError,
    remove_dir,
    remove_leftovers,
    write_dir,
    write_file,
    write_json,
)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_file_replaces_and_a_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    write_json(target, {"v": 2})
    assert target.read_text().strip().endswith("}") and '"v": 2' in target.read_text()

    def half_then_full_disk(p):
        p.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=rf"cannot write {target}: No space left on device"):
        write_file(target, half_then_full_disk)
    assert '"v": 2' in target.read_text() and names(tmp_path) == ["a.json"]


def test_write_dir_swaps_a_complete_folder_in(tmp_path):
    target = tmp_path / "adapter"
    write_dir(target, lambda p: (p / "w").write_text("one"))
    seen = []

    def build(p):
        seen.append(names(tmp_path))  # while the new one is built, the old one is still there
        (p / "w").write_text("two")

    write_dir(target, build)
    assert "adapter" in seen[0] and (target / "w").read_text() == "two"
    assert names(tmp_path) == ["adapter"]


def test_write_dir_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    write_dir(target, lambda p: (p / "w").write_text("one"))

    def crash(p):
        (p / "w").write_text("half")
        raise OSError(30, "Read-only file system")

    with pytest.raises(WriteError, match="Read-only file system"):
        write_dir(target, crash)
    assert (target / "w").read_text() == "one" and names(tmp_path) == ["adapter"]
    with pytest.raises(RuntimeError):  # not an OSError: raised as is, still cleaned up
        write_dir(target, lambda p: (_ for _ in ()).throw(RuntimeError("bug")))
    assert names(tmp_path) == ["adapter"]


def test_keep_existing_keeps_the_first_complete_copy(tmp_path):
    target = tmp_path / "cache"
    write_dir(target, lambda p: (p / "w").write_text("first"))
    write_dir(target, lambda p: (p / "w").write_text("second"), keep_existing=True)
    assert (target / "w").read_text() == "first" and names(tmp_path) == ["cache"]


def test_unwritable_parent_is_a_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=f"cannot write {blocker}/sub/a"):
        write_json(blocker / "sub" / "a", {})


def test_leftovers_are_removed_and_an_orphaned_old_version_restored(tmp_path):
    (tmp_path / ".adapter.old-1-abcd").mkdir()
    (tmp_path / ".adapter.old-1-abcd" / "w").write_text("only copy")
    (tmp_path / ".step.tmp-1-abcd").mkdir()
    (tmp_path / "best").mkdir()
    (tmp_path / ".best.old-2-ffff").mkdir()
    (tmp_path / ".a.json.tmp-3-0000").write_text("{")
    remove_leftovers(tmp_path)
    assert names(tmp_path) == ["adapter", "best"]
    assert (tmp_path / "adapter" / "w").read_text() == "only copy"
    assert not os.listdir(tmp_path / "best")


def test_remove_dir_renames_away_before_deleting(tmp_path, monkeypatch):
    target = tmp_path / "step-000005"
    target.mkdir()
    (target / "a").write_text("x")
    (target / "b").write_text("y")
    remove_dir(target)
    assert names(tmp_path) == []
    remove_dir(target)  # already gone: nothing to do

    target.mkdir()
    (target / "a").write_text("x")
    (target / "b").write_text("y")
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (Path(path) / "a").unlink()
        raise KeyboardInterrupt  # the process dies with the folder half deleted

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        remove_dir(target)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    (left,) = names(tmp_path)  # never visible under its own name half deleted
    assert left.startswith(".step-000005.del-") and not target.exists()
    remove_leftovers(tmp_path)  # deleted, not restored (unlike an orphaned .old- folder)
    assert names(tmp_path) == []


def test_remove_dir_failure_is_a_write_error(tmp_path, monkeypatch):
    target = tmp_path / "d"
    target.mkdir()

    def read_only(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "rename", read_only)
    with pytest.raises(WriteError, match=f"cannot write {target}: .*Read-only file system"):
        remove_dir(target)
    monkeypatch.undo()
    assert target.is_dir()


def test_replacing_dir_keeps_the_old_folder_until_the_block_succeeds(tmp_path):
    from lorafit.atomic import replacing_dir

    target = tmp_path / "run"
    target.mkdir()
    (target / "w").write_text("old")
    with pytest.raises(RuntimeError):
        with replacing_dir(target) as folder:
            folder.mkdir()
            (folder / "w").write_text("half")
            raise RuntimeError("killed")
    assert (target / "w").read_text() == "old" and names(tmp_path) == ["run"]
    with replacing_dir(target) as folder:
        folder.mkdir()
        (folder / "w").write_text("new")
    assert (target / "w").read_text() == "new" and names(tmp_path) == ["run"]
