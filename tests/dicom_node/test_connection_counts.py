"""The node's connection counts: kept in the first process, which admits each connection to the
SCP process holding the fewest; released and claimed by the extra SCP processes over a real
socket pair; freed when an extra process goes; and scp_processes "auto"."""

from __future__ import annotations

import os
import socket

import pytest

from dicom_node.config import Settings
from dicom_node.connection_counts import LOCAL, ConnectionCounts, CountsUnavailable, RemoteCounts, serve_counts
from dicom_node.connection_handoff import Handoff
from dicom_node.cpu_limit import cgroup_cpu_limit, usable_cpus
from dicom_node.frontdoor import FrontDoor, Limits
from tests.support.waiting import wait_until


def two_extra_processes(**limits) -> ConnectionCounts:
    counts = ConnectionCounts(**{"max_per_host": 0, "max_associations": 0, **limits})
    counts.join("scp-process-2")
    counts.join("scp-process-3")
    return counts


def test_each_connection_goes_to_the_process_holding_the_fewest():
    counts = two_extra_processes()
    owners = [counts.admit(f"10.0.0.{n}") for n in range(6)]
    # Ties go to an extra process (the first also runs the assembler and the HTTP service).
    assert owners == ["scp-process-2", "scp-process-3", LOCAL] * 2
    counts.release("10.0.0.1", owner="scp-process-3")
    counts.release("10.0.0.4", owner="scp-process-3")
    assert counts.admit("10.0.0.9") == "scp-process-3"
    assert {o: counts.held_by(o) for o in ("scp-process-2", "scp-process-3", LOCAL)} == {
        "scp-process-2": 2, "scp-process-3": 1, LOCAL: 2}


def test_per_host_limit_counts_every_owner():
    counts = two_extra_processes(max_per_host=2)
    assert counts.admit("10.0.0.1") == "scp-process-2"
    assert counts.admit("10.0.0.1") == "scp-process-3"
    assert counts.admit("10.0.0.1") is None  # the node's limit, not one process's
    assert counts.admit("10.0.0.2") == LOCAL
    counts.release("10.0.0.1", owner="scp-process-2")
    assert counts.admit("10.0.0.1") == "scp-process-2"
    assert counts.per_host() == {"10.0.0.1": 2, "10.0.0.2": 1}


def test_release_frees_only_what_its_owner_holds():
    counts = two_extra_processes(max_per_host=1, max_associations=1)
    assert counts.admit("10.0.0.1") == "scp-process-2" and counts.claim(owner="scp-process-2")
    counts.release("10.0.0.1")  # this process never admitted it: a stray release frees nothing
    counts.unclaim()
    assert counts.admit("10.0.0.1") is None and not counts.claim()


def test_a_forgotten_process_is_freed_and_takes_no_more():
    counts = two_extra_processes(max_per_host=8, max_associations=2)
    for _ in range(3):
        counts.admit("10.0.0.1")
    counts.claim(owner="scp-process-2")
    counts.claim()
    assert not counts.claim(owner="scp-process-3")
    counts.forget("scp-process-2")
    assert counts.per_host() == {"10.0.0.1": 2}
    assert counts.associations() == 1
    assert counts.claim(owner="scp-process-3")
    assert {counts.admit("10.0.0.1") for _ in range(4)} == {"scp-process-3", LOCAL}


def test_a_process_that_left_takes_no_new_connections_and_keeps_what_it_holds():
    counts = two_extra_processes()
    assert counts.admit("10.0.0.1") == "scp-process-2"
    counts.leave("scp-process-2")
    assert {counts.admit("10.0.0.1") for _ in range(4)} == {"scp-process-3", LOCAL}
    assert counts.held_by("scp-process-2") == 1
    counts.release("10.0.0.1", owner="scp-process-2")
    assert counts.held_by("scp-process-2") == 0


def test_a_failed_pass_counts_the_connection_here_and_sends_no_more_there():
    """The link to an extra process is gone: FrontDoor.pass_on serves it in this process."""
    door = FrontDoor(Limits(1.0, 1.0, 0, 0), lambda refusal: None, handoff=Handoff())
    door.counts.join("scp-process-2")
    assert door.admit("10.0.0.1") == "scp-process-2"
    with socket.socket() as connection:
        assert not door.pass_on("scp-process-2", "10.0.0.1", connection, "plain", ("10.0.0.1", 104))
    assert door.counts.held_by(LOCAL) == 1 and door.counts.held_by("scp-process-2") == 0
    assert door.admit("10.0.0.1") == LOCAL


def test_a_connection_that_could_not_be_passed_on_is_counted_here():
    counts = two_extra_processes(max_per_host=2)
    owner = counts.admit("10.0.0.1")
    counts.move("10.0.0.1", owner)
    assert counts.held_by(owner) == 0 and counts.held_by(LOCAL) == 1
    assert counts.per_host() == {"10.0.0.1": 1}


@pytest.fixture
def linked():
    counts = ConnectionCounts(max_per_host=2, max_associations=1)
    counts.join("scp-process-2")
    ours, theirs = socket.socketpair()
    thread = serve_counts(counts, ours, owner="scp-process-2")
    remote = RemoteCounts(theirs)
    yield counts, remote, thread
    remote.close()
    thread.join(5)


def test_remote_calls_reach_the_first_process(linked):
    counts, remote, _ = linked
    assert counts.admit("10.0.0.1") == "scp-process-2" and counts.admit("10.0.0.1") == LOCAL
    assert remote.claim() and not remote.claim() and not counts.claim()
    remote.release("10.0.0.1")
    remote.unclaim()
    assert remote.claim()  # answered after the release and the unclaim: the calls keep their order
    assert counts.per_host() == {"10.0.0.1": 1} and counts.admit("10.0.0.1") == "scp-process-2"


def test_a_closed_link_frees_what_the_extra_process_held(linked):
    counts, remote, thread = linked
    assert counts.admit("10.0.0.1") == "scp-process-2" and remote.claim()
    remote.close()  # what a kill -9 of the extra process does to its end
    thread.join(5)
    assert not thread.is_alive()
    assert counts.per_host() == {} and counts.associations() == 0
    assert counts.admit("10.0.0.1") == LOCAL  # it takes no more connections


def test_a_link_without_answers_fails_clearly_and_stays_failed():
    ours, theirs = socket.socketpair()
    remote = RemoteCounts(theirs)
    ours.close()  # the first process's end is gone
    with pytest.raises(CountsUnavailable, match="first SCP process does not answer"):
        remote.claim()
    with pytest.raises(CountsUnavailable):
        remote.release("10.0.0.1")
    remote.close()


def test_a_failed_link_is_shut_down_and_ends_the_extra_process(monkeypatch):
    """Shut down, the link reads as closed at the first process, which frees what the extra one
    held (it could not release it any more); and the extra process is told to end."""
    monkeypatch.setattr("dicom_node.connection_counts.ANSWER_TIMEOUT", 0.3)
    ours, theirs = socket.socketpair()
    failed = []
    remote = RemoteCounts(theirs, on_failure=lambda: failed.append(True))
    with pytest.raises(CountsUnavailable):
        remote.claim()  # the first process takes the call and never answers
    assert failed == [True]
    ours.settimeout(2)
    assert ours.recv(64) == b"C\n" and ours.recv(64) == b""  # then end of file
    ours.close()
    remote.close()


def test_a_garbled_call_ends_the_link_and_frees_its_counts():
    counts = ConnectionCounts(max_per_host=1, max_associations=0)
    ours, theirs = socket.socketpair()
    thread = serve_counts(counts, ours, owner="scp-process-2")
    theirs.sendall(b"C\n")
    assert theirs.recv(2) == b"1\n" and counts.associations() == 1
    theirs.sendall(b"A 10.0.0.1\n")  # not a call any longer: admitting is the first process's
    thread.join(5)
    assert not thread.is_alive() and counts.associations() == 0
    theirs.close()


def write_cgroup(root, **files: str):
    for name, text in files.items():
        path = root / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cgroup_v2_cpu_limit(tmp_path):
    assert cgroup_cpu_limit(write_cgroup(tmp_path / "a", **{"cpu.max": "250000 100000\n"})) == 2.5
    assert cgroup_cpu_limit(write_cgroup(tmp_path / "b", **{"cpu.max": "max 100000\n"})) is None
    assert cgroup_cpu_limit(tmp_path / "none") is None


def test_cgroup_v1_cpu_limit(tmp_path):
    root = write_cgroup(tmp_path, **{"cpu__cpu.cfs_quota_us": "150000\n", "cpu__cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root) == 1.5
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root) is None


def test_usable_cpus_rounds_the_limit_up_and_never_exceeds_the_cpus(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    assert usable_cpus(write_cgroup(tmp_path / "half", **{"cpu.max": "50000 100000"})) == 1
    assert usable_cpus(write_cgroup(tmp_path / "big", **{"cpu.max": "6400000 100000"})) == cpus
    assert usable_cpus(tmp_path / "none") == cpus
    if cpus > 1:
        assert usable_cpus(write_cgroup(tmp_path / "one-and-a-bit", **{"cpu.max": "110000 100000"})) == 2


def test_scp_processes_auto_follows_the_usable_cpus(monkeypatch):
    monkeypatch.setenv("DICOM_NODE_SCP_PROCESSES", "auto")
    assert Settings().scp_processes == usable_cpus()
    monkeypatch.setenv("DICOM_NODE_SCP_PROCESSES", "3")
    assert Settings().scp_processes == 3
    monkeypatch.setenv("DICOM_NODE_SCP_PROCESSES", "0")
    with pytest.raises(ValueError):
        Settings()


def test_remote_counts_wait_is_bounded(monkeypatch):
    """A first process that takes the call but never answers: the extra process gives up."""
    monkeypatch.setattr("dicom_node.connection_counts.ANSWER_TIMEOUT", 0.3)
    ours, theirs = socket.socketpair()
    remote = RemoteCounts(theirs)
    with pytest.raises(CountsUnavailable):
        remote.claim()
    wait_until(lambda: ours.recv(64) == b"C\n", timeout=2, what="the call sent")
    ours.close()
    remote.close()
