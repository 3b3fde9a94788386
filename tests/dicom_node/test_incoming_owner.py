"""Leftovers in .incoming: only those of processes that are gone are removed, with real processes
holding (or, killed, dropping) their owner locks (incoming_owner.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dicom_node import incoming_owner
from dicom_node.incoming_owner import CLAIMING_GRACE_SECONDS, UNOWNED_GRACE_SECONDS, new_path, remove_leftovers
from tests.support.procs import REPO

WRITER = """
import sys, time
from pathlib import Path
from dicom_node.incoming_owner import new_path
folder = Path(sys.argv[1])
for suffix in (".rx.dcm", ".part"):
    new_path(folder, suffix).write_bytes(b"half an instance")
print("written", flush=True)
time.sleep(600)
"""


def writer(folder: Path) -> subprocess.Popen:
    """Another process (an SCP process, a worker) with two files in `folder`, still running."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    return proc


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_only_the_files_of_processes_that_are_gone_are_removed(tmp_path):
    folder = tmp_path / ".incoming"
    folder.mkdir()
    killed, alive = writer(folder), writer(folder)
    try:
        ours = new_path(folder, ".part")
        ours.write_bytes(b"being written here")
        before = names(folder)
        killed.send_signal(signal.SIGKILL)  # its lock goes with it
        killed.wait()

        assert remove_leftovers(folder) == 2
        left = names(folder)
        assert ours.name in left
        assert len(left) == len(before) - 3  # the killed one's two files and its owner file
        assert remove_leftovers(folder) == 0  # nothing of a live process is touched, however often
        assert names(folder) == left
    finally:
        alive.kill()
        alive.wait()
    assert remove_leftovers(folder) == 2  # now that one is gone too
    assert names(folder) == {ours.name, f"{ours.name.split('-')[0]}.owner"}


def test_files_named_before_owners_existed_are_leftovers_once_an_hour_old(tmp_path):
    folder = tmp_path / ".incoming"
    folder.mkdir()
    unowned = [folder / "rx-0123456789abcdef0123456789abcdef.dcm", folder / "0123456789abcdef0123456789abcdef.part"]
    for path in unowned:  # an older version's names: during a rolling upgrade it may be writing them
        path.write_bytes(b"x")
    assert remove_leftovers(folder) == 0 and len(names(folder)) == 2
    old = time.time() - UNOWNED_GRACE_SECONDS - 5
    for path in unowned:
        os.utime(path, (old, old))
    assert remove_leftovers(folder) == 2 and names(folder) == set()


def test_what_cannot_be_removed_is_left_and_the_rest_goes(tmp_path, caplog):
    folder = tmp_path / ".incoming"
    folder.mkdir()
    stray = folder / "0123456789abcdef-a-folder"  # a dead owner's name, but a folder: unlink fails
    stray.mkdir()
    (folder / "0123456789abcdef-0123.part").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="dicom_node.incoming_owner"):
        assert remove_leftovers(folder) == 1
    assert names(folder) == {stray.name} and "incoming.leftover_not_removed" in caplog.text


def test_an_owner_file_being_created_is_left_alone_until_it_is_old(tmp_path):
    folder = tmp_path / ".incoming"
    folder.mkdir()
    claiming = folder / ".0123456789abcdef.claiming"  # created, not yet locked and renamed
    claiming.write_bytes(b"")
    assert remove_leftovers(folder) == 0 and claiming.exists()
    old = time.time() - CLAIMING_GRACE_SECONDS - 5
    os.utime(claiming, (old, old))  # a process that died between creating and renaming it
    assert remove_leftovers(folder) == 1 and not claiming.exists()


FORKING_WRITER = """
import os, sys, time
from pathlib import Path
from dicom_node.incoming_owner import new_path
new_path(Path(sys.argv[1]), ".part").write_bytes(b"the parent's")
child = os.fork()
if child == 0:
    print("child", os.getpid(), flush=True)  # after the fork handlers ran
    time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def test_a_forked_child_does_not_keep_its_parents_files_in_use(tmp_path):
    """A Celery pool process outliving its master: the master's leftovers are still removed."""
    folder = tmp_path / ".incoming"
    folder.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", FORKING_WRITER, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline().split()[1])
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert remove_leftovers(folder) == 1 and names(folder) == set()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_forked_child_names_its_files_apart_from_its_parent(tmp_path):
    """Names are the process's token and a count: a child forked after its parent named files
    takes a token of its own, so the two never make the same name."""
    parent_names = {incoming_owner.new_path(tmp_path, ".part").name for _ in range(3)}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, " ".join(incoming_owner.new_path(tmp_path, ".part").name for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child_names = set(os.read(read_end, 4096).decode().split())
    os.waitpid(pid, 0)
    os.close(read_end)
    assert len(child_names) == 3 and not child_names & parent_names
    assert {name.split("-")[0] for name in child_names}.isdisjoint({name.split("-")[0] for name in parent_names})
