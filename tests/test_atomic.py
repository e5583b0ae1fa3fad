"""Folders that appear whole or not at all, and what a stopped build leaves."""

import os

from evc.atomic import remove_own, staged, temp_dir


def test_a_stop_removes_this_processs_temporary_folders_and_no_others(tmp_path):
    final = tmp_path / "cache" / "entry"
    mine = temp_dir(final)  # made, but not yet handed to a `staged` block when the stop landed
    theirs = final.parent / f".entry.{os.getpid() + 1}.abc.tmp"
    theirs.mkdir()
    remove_own()
    assert not mine.exists() and theirs.exists()


def test_a_staged_folder_is_put_in_place_whole(tmp_path):
    final = tmp_path / "entry"
    with staged(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1" and not list(tmp_path.glob("*.tmp"))
