"""Chaos run of the whole local stack: studies arrive from a modality while processes crash.

Used by `benchmarks/chaos.py` (the acceptance benchmark, several seeds) and by
`tests/pipeline/test_chaos.py` (one CI-sized seed). Everything is real and on loopback: Redis
with AOF, Orthanc as the PACS, `dicom-node serve`, one io and one gpu worker (LocalStack), and
DCMTK `storescu` as the modality. Faults are drawn from a seed (FaultPlan, printable so a run can
be reproduced): kill -9 of a process group (node, io worker, gpu worker, Redis), each restarted
after a few seconds; a PACS outage (Orthanc stopped, started again on the same ports and
storage); and the SCP killed half-way through one association of the multi-instance study, sent
through a throttled relay so the kill lands mid-transfer; the modality resends the whole study
until it is acknowledged, as a modality would.

Then the run waits for the node to come to rest and checks (Outcome): every study has exactly
one *current* report of the node in the PACS (several only as a revision chain naming
predecessors), every job is done or superseded, every acknowledged instance is in the index with
its file, and the time from the last fault's end to rest. The harness never calls `dicom-node
retry` and never writes to the node's database (it reads it with sqlite3, query_only).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import json
import math
import os
import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.identity import RESULT_SERIES_DESCRIPTION
from dicom_node.local_stack.scenario import ARCHIVE_LOADER_AE
from dicom_node.local_stack.procs import wait_for_port
from dicom_node.local_stack.stack import MODALITY_AE, NODE_AE, LocalStack, Ports
from dicom_node.scu import Peer, send

FINAL_JOB_STATES = frozenset({"done", "superseded"})  # finished, nothing left to do, not a failure
RESTING_JOB_STATES = FINAL_JOB_STATES | {"failed"}  # nothing will happen to it without a human
KILLABLE = ("node", "worker-io1", "worker-gpu1", "redis")
STORESCU = "/usr/bin/storescu"


# ----------------------------------------------------------------------------- the studies


@dataclass(frozen=True)
class Study:
    label: str
    patient_id: str
    study_uid: str
    files: tuple[Path, ...]
    sop_uids: tuple[str, ...]
    arrival_s: float  # when the modality starts sending it, from the start of the run


@dataclass(frozen=True)
class Cohort:
    priors: tuple[Path, ...]  # one prior study per patient, seeded into the PACS
    studies: tuple[Study, ...]  # the current studies, sent to the node

    @property
    def multi(self) -> Study:
        """The multi-instance study (the one killed mid-transfer)."""
        return max(self.studies, key=lambda s: len(s.files))

    @property
    def patients(self) -> int:
        return len({s.patient_id for s in self.studies})

    def describe(self) -> str:
        multi = self.multi
        return (f"{len(self.studies)} current studies from {self.patients} patients (each with a prior in the PACS); "
                f"{multi.label} has {len(multi.files)} instances; arrivals at "
                + ", ".join(f"{s.arrival_s:.1f}" for s in self.studies) + " s")


def make_cohort(folder: Path, seed: int = 0, studies: int = 16, patients: int = 6, multi_instances: int = 12,
                size: int = 256, gap_s: tuple[float, float] = (1.0, 3.0)) -> Cohort:
    """Synthetic chest radiographs: patient p gets a prior (to the PACS) and current studies
    p, p + patients, ... (a later date each); one current study is a DX study of `multi_instances`
    images (the node analyses the first; all must be stored)."""
    from inference.phantoms import CHEST_CHANGES, PatientInfo, make_chest_pair

    if studies < patients:
        raise ValueError("need at least one current study per patient")
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    multi_at = rng.randrange(studies // 3, max(studies // 3 + 1, 2 * studies // 3))
    priors, currents, arrival = [], [], 0.0
    for number in range(studies):
        p, visit = number % patients, number // patients
        info = PatientInfo(patient_id=f"CHAOS-{seed}-{p:02d}", patient_name=f"Chaos^Patient{p:02d}",
                           prior_date=date(2025, 3, 1), prior_accession=f"CP{seed}{p:02d}",
                           current_date=date(2026, 1, 10) + timedelta(days=30 * visit),
                           current_accession=f"CC{seed}{p:02d}{visit:02d}")
        # The same (patient, seed) gives the same anatomy: later visits match the one prior.
        pair = make_chest_pair(1000 * seed + p, rng.choice(CHEST_CHANGES), size=size, patient=info)
        if visit == 0:
            path = folder / f"prior-p{p:02d}.dcm"
            pair.prior.save_as(path, enforce_file_format=True)
            priors.append(path)
        label = f"s{number:02d}"
        instances = multi_instances if number == multi_at else 1
        files, sops = _write_instances(folder / label, pair.current, instances)
        arrival += rng.uniform(*gap_s)
        currents.append(Study(label, info.patient_id, str(pair.current.StudyInstanceUID), files, sops, round(arrival, 2)))
    return Cohort(tuple(priors), tuple(currents))


def _write_instances(folder: Path, image, count: int) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """`count` images of one series (instance numbers 1..count); the first is the image itself."""
    folder.mkdir(parents=True, exist_ok=True)
    files, sops = [], []
    for number in range(1, count + 1):
        ds = copy.deepcopy(image)
        if number > 1:
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(image.SOPInstanceUID), str(number)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        path = folder / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(str(ds.SOPInstanceUID))
    return tuple(files), tuple(sops)


# ----------------------------------------------------------------------------- the fault plan


@dataclass(frozen=True)
class Fault:
    kind: str  # "kill" (kill -9 of the process group), "outage" (the PACS stopped), "kill_mid_transfer"
    target: str  # "node", "worker-io1", "worker-gpu1", "redis", "orthanc"
    at_s: float  # planned start, from the start of the run (kill_mid_transfer: when that transfer starts)
    down_s: float  # how long it stays down before it is started again

    def describe(self) -> str:
        what = {"kill": f"kill -9 {self.target}", "outage": "PACS outage (Orthanc stopped)",
                "kill_mid_transfer": f"kill -9 {self.target} half-way through the multi-instance transfer"}[self.kind]
        return f"t={self.at_s:6.1f}s  {what}, restarted after {self.down_s:.1f}s"


@dataclass(frozen=True)
class FaultPlan:
    seed: int | None  # None: the control run
    faults: tuple[Fault, ...] = ()

    @property
    def label(self) -> str:
        return "control" if self.seed is None else str(self.seed)

    def describe(self) -> str:
        if not self.faults:
            return f"fault plan {self.label}: no faults"
        return f"fault plan seed {self.seed}:\n" + "\n".join("  " + f.describe() for f in self.faults)


CONTROL = FaultPlan(None)


def plan_faults(seed: int, cohort: Cohort, kills: tuple[str, ...] = KILLABLE, down_s: tuple[float, float] = (1.0, 5.0),
                pacs_outage_s: float = 20.0, mid_transfer: bool = True) -> FaultPlan:
    """Faults at seeded moments while studies arrive (and shortly after the last one)."""
    rng = random.Random(seed)
    last = max(s.arrival_s for s in cohort.studies)
    window = (2.0, max(last + 5.0, 10.0))
    multi_at = cohort.multi.arrival_s
    faults = []
    if mid_transfer:
        faults.append(Fault("kill_mid_transfer", "node", multi_at, round(rng.uniform(*down_s), 1)))
    for target in kills:
        # Another node kill must not land on the mid-transfer one (it would send the study early).
        avoid = (multi_at - 8.0, multi_at + 15.0) if target == "node" and mid_transfer else None
        faults.append(Fault("kill", target, _draw(rng, window, avoid), round(rng.uniform(*down_s), 1)))
    if pacs_outage_s > 0:
        faults.append(Fault("outage", "orthanc", round(rng.uniform(2.0, max(3.0, last - 5.0)), 1), pacs_outage_s))
    return FaultPlan(seed, tuple(sorted(faults, key=lambda f: f.at_s)))


def _draw(rng: random.Random, window: tuple[float, float], avoid: tuple[float, float] | None) -> float:
    for _ in range(100):
        at = rng.uniform(*window)
        if avoid is None or not avoid[0] <= at <= avoid[1]:
            return round(at, 1)
    return round(avoid[1] + rng.uniform(0.0, 3.0), 1)


# ----------------------------------------------------------------------------- processes


def set_child_subreaper(enabled: bool) -> None:
    """Orphans of a killed process group (a worker's pool children) become our children, so
    that we can reap them instead of leaving zombies behind (Linux prctl PR_SET_CHILD_SUBREAPER)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1 if enabled else 0, 0, 0, 0)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgrp = text.rsplit(")", 1)[1].split()[:3]
    return state, int(ppid), int(pgrp)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def reap_zombie_children(pgid: int | None = None) -> int:
    """waitpid() our zombie children (of one process group, or all): returns how many."""
    reaped = 0
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat and stat[0] == "Z" and stat[1] == os.getpid() and (pgid is None or stat[2] == pgid):
            try:
                os.waitpid(pid, os.WNOHANG)
                reaped += 1
            except ChildProcessError:
                pass
    return reaped


def wait_group_gone(pgid: int, timeout: float = 15.0) -> None:
    """Wait until no live process is left in the group, reaping those that were reparented to us."""
    deadline = time.monotonic() + timeout
    while True:
        reap_zombie_children(pgid)
        alive = [pid for pid in _all_pids() if (s := _proc_stat(pid)) and s[2] == pgid and s[0] not in "ZX"]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {pgid} still has live members {alive} after SIGKILL")
        time.sleep(0.05)


class Services:
    """Kills and restarts the stack's parts. The lock guards only the stack's process table (not
    thread-safe); waiting for a process to die or to listen happens outside it, so that faults of
    different parts can overlap."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.lock = threading.Lock()

    def kill(self, target: str) -> None:
        if target == "orthanc":
            self.stack.orthanc.stop()  # an outage: the PACS goes away (and comes back on restart)
            return
        with self.lock:
            if target == "redis":
                proc = self.stack.redis.proc
                os.killpg(proc.pid, signal.SIGKILL)
                self.stack.redis.proc = None
            else:
                proc = self.stack.processes.pop(target)
                os.killpg(proc.pid, signal.SIGKILL)  # the process and its pool children at once
            self.stack.write_pids()
        proc.wait()
        wait_group_gone(proc.pid)  # start_new_session: the leader's pid is the group id

    def restart(self, target: str) -> None:
        if target == "orthanc":
            self.stack.orthanc.start()  # same root: its storage and index survive
        elif target == "redis":
            self.stack.redis.start()  # replays its AOF
        elif target == "node":
            with self.lock:
                proc = self.stack._spawn("node", ["serve"])  # start_node(), without holding the lock
            wait_for_port(self.stack.ports.node, timeout=60, proc=proc)
        else:
            queue, number = target.removeprefix("worker-")[:-1], int(target[-1])
            with self.lock:
                self.stack.start_worker(queue, number)
        with self.lock:
            self.stack.write_pids()


# ----------------------------------------------------------------------------- the modality


class ThrottledProxy:
    """A loopback relay to the node that forwards what the sender sends at `rate` bytes/s (the
    answers unthrottled): a slow link, so that a crash can land in the middle of an association.
    When either side closes, both are closed (the sender sees the node's crash)."""

    CHUNK = 8192

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, name="throttled-proxy", daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            client.close()  # the node is down: the sender sees a closed connection
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answers = threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True)
        answers.start()
        self._pump(client, upstream, self.rate)
        answers.join()
        client.close()
        upstream.close()

    def _pump(self, source: socket.socket, sink: socket.socket, rate: float) -> None:
        try:
            while data := source.recv(self.CHUNK):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@dataclass
class Transfer:
    """What the modality did to get one study acknowledged."""

    study: str
    attempts: int = 0
    accepted_s: float | None = None  # when the whole study was acknowledged, from the start of the run
    errors: list[str] = field(default_factory=list)


def storescu(files: tuple[Path, ...], port: int, log: Path, timeout: float = 120.0) -> tuple[bool, str]:
    """One association of DCMTK storescu: (every instance acknowledged, the reason if not)."""
    command = [STORESCU, "-v", "-R", "-aec", NODE_AE, "-aet", MODALITY_AE, "-ta", "15", "-ts", "30",
               "127.0.0.1", str(port), *map(str, files)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, TCP_NODELAY="1"), start_new_session=True)
    except subprocess.TimeoutExpired:
        return False, f"storescu timed out after {timeout:.0f}s"
    output = run.stdout + run.stderr
    with log.open("a") as out:
        out.write(f"--- {time.strftime('%H:%M:%S')} rc={run.returncode} port={port}\n{output}")
    acknowledged = sum(1 for line in output.splitlines()
                       if "Received Store Response" in line and ("(Success" in line or "Warning" in line))
    if run.returncode == 0 and acknowledged == len(files):
        return True, ""
    last = next((line for line in reversed(output.splitlines()) if line.startswith(("E:", "F:"))), "")
    return False, f"rc={run.returncode}, {acknowledged}/{len(files)} acknowledged {last}".strip()


def send_until_accepted(study: Study, port: int, t0: float, deadline: float, log: Path, retry_s: float = 1.0) -> Transfer:
    """Send the whole study at its arrival time, again and again until every instance is acknowledged."""
    transfer = Transfer(study.label)
    _sleep_until(t0 + study.arrival_s)
    while time.monotonic() < deadline:
        transfer.attempts += 1
        ok, error = storescu(study.files, port, log)
        if ok:
            transfer.accepted_s = round(time.monotonic() - t0, 2)
            return transfer
        transfer.errors.append(error)
        time.sleep(retry_s)
    return transfer


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


# ----------------------------------------------------------------------------- observing the node and the PACS


class NodeDb:
    """Read-only look at the node's index (sqlite3, query_only): never the pipeline's API."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def query(self, sql: str, *args) -> list[tuple]:
        try:
            with sqlite3.connect(self.path, timeout=10) as conn:
                conn.execute("PRAGMA query_only = ON")
                return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # not created yet (the node has not started), or busy: ask again next time

    def jobs(self) -> list[tuple[str, str, str, str]]:
        return self.query("SELECT job_key, study_uid, state, last_error FROM jobs")

    def study_states(self) -> dict[str, str]:
        return dict(self.query("SELECT study_uid, state FROM studies"))

    def instance_count(self, study_uid: str) -> int:
        rows = self.query("SELECT count(*) FROM instances WHERE study_uid = ?", study_uid)
        return rows[0][0] if rows else 0

    def lost_instances(self, study: Study) -> list[str]:
        """SOP Instance UIDs acknowledged to the modality but not in the index, or without their file."""
        stored = dict(self.query("SELECT sop_instance_uid, path FROM instances WHERE study_uid = ?", study.study_uid))
        return [uid for uid in study.sop_uids if uid not in stored or not Path(stored[uid]).is_file()]


@dataclass(frozen=True)
class NodeReport:
    study_uid: str
    sop_uid: str
    predecessors: frozenset[str]  # PredecessorDocumentsSequence > ... > ReferencedSOPInstanceUID


class PacsReports:
    """The node's SRs in Orthanc (SeriesDescription RESULT_SERIES_DESCRIPTION), each read once."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.seen: dict[str, NodeReport | None] = {}

    def poll(self) -> dict[str, list[NodeReport]] | None:
        """Reports by study UID; None while the PACS does not answer."""
        orthanc = self.stack.orthanc
        try:
            for orthanc_id in orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}}) or []:
                if orthanc_id not in self.seen:
                    self.seen[orthanc_id] = _node_report(orthanc.instance_file(orthanc_id))
        except (urllib.error.URLError, ConnectionError, OSError):
            return None
        reports: dict[str, list[NodeReport]] = {}
        for report in self.seen.values():
            if report is not None:
                reports.setdefault(report.study_uid, []).append(report)
        return reports


def _node_report(data: bytes) -> NodeReport | None:
    ds = dcmread(BytesIO(data), stop_before_pixels=True)
    if ds.get("SeriesDescription", "") != RESULT_SERIES_DESCRIPTION:
        return None
    predecessors = frozenset(
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.get("PredecessorDocumentsSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for sop in series.get("ReferencedSOPSequence", []))
    return NodeReport(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), predecessors)


def report_status(reports: list[NodeReport]) -> str:
    """"once": one current report (others, if any, are its predecessors, a revision chain);
    "missing": none; "doubled": two or more that no later report names as predecessor."""
    if not reports:
        return "missing"
    uids = {r.sop_uid for r in reports}
    named = set().union(*(r.predecessors for r in reports))
    return "once" if len(uids - named) == 1 else "doubled"


@dataclass
class Snapshot:
    at: float  # monotonic
    reports: dict[str, list[NodeReport]] | None
    jobs: list[tuple[str, str, str, str]]
    study_states: dict[str, str]

    def study_at_rest(self, study: Study) -> bool:
        jobs = [j for j in self.jobs if j[1] == study.study_uid]
        if not jobs or self.study_states.get(study.study_uid) == "receiving":
            return False
        if any(j[2] not in RESTING_JOB_STATES for j in jobs):
            return False
        return bool(self.reports.get(study.study_uid)) or any(j[2] == "failed" for j in jobs)

    def at_rest(self, cohort: Cohort) -> bool:
        """Nothing more will happen: every study's jobs final (or failed) with its report in the PACS."""
        if self.reports is None:
            return False
        return all(j[2] in RESTING_JOB_STATES for j in self.jobs) and all(self.study_at_rest(s) for s in cohort.studies)


def observe(db: NodeDb, pacs: PacsReports) -> Snapshot:
    return Snapshot(time.monotonic(), pacs.poll(), db.jobs(), db.study_states())


def wait_for_rest(db: NodeDb, pacs: PacsReports, cohort: Cohort, deadline: float, quiet_s: float,
                  interval: float = 0.5) -> tuple[float | None, Snapshot]:
    """The moment the node came to rest and stayed there for `quiet_s` (a late reanalysis or a
    second delivery would show up in that time), or None by the deadline; and the last snapshot."""
    rest_since = None
    while True:
        snapshot = observe(db, pacs)
        if snapshot.at_rest(cohort):
            rest_since = rest_since or snapshot.at
            if snapshot.at - rest_since >= quiet_s:
                return rest_since, snapshot
        else:
            rest_since = None
        if time.monotonic() > deadline:
            return None, snapshot
        time.sleep(interval)


# ----------------------------------------------------------------------------- one run


@dataclass
class RunConfig:
    max_wait_s: float = 180.0  # after the last fault (or the last study acknowledged): then give up
    quiet_s: float = 8.0  # at rest this long before the verdict (> study_idle_seconds + polling)
    settle_limit_s: float = 60.0
    transfer_s: float = 4.0  # the multi-instance study's first association takes about this long
    send_deadline_s: float = 300.0  # the modality stops resending after this long
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class FaultRecord:
    fault: Fault
    down_s: float | None = None  # when it went down, from the start of the run
    up_s: float | None = None  # when it was started again
    note: str = ""


@dataclass
class Outcome:
    label: str  # "control" or the seed
    studies: int
    sr_once: int = 0
    sr_missing: list[str] = field(default_factory=list)  # study labels
    sr_doubled: list[str] = field(default_factory=list)
    jobs_unfinished: list[str] = field(default_factory=list)  # "study: state (last error)"
    jobs_failed: list[str] = field(default_factory=list)
    instances_lost: list[str] = field(default_factory=list)  # "study: SOP Instance UID"
    settle_s: float | None = None  # last fault's end (control: last study acknowledged) -> at rest
    processing_s: float | None = None  # first arrival -> at rest
    last_fault_end_s: float | None = None
    last_accepted_s: float | None = None
    settle_limit_s: float = 60.0
    human_interventions: int = 0  # the harness never runs `dicom-node retry` nor edits the index
    faults: list[FaultRecord] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    harness_problems: list[str] = field(default_factory=list)
    logs: dict[str, dict] = field(default_factory=dict)
    workdir: str = ""

    @property
    def passed(self) -> bool:
        return (self.sr_once == self.studies and not (self.sr_missing or self.sr_doubled or self.jobs_unfinished
                or self.jobs_failed or self.instances_lost or self.harness_problems)
                and self.settle_s is not None and self.settle_s <= self.settle_limit_s)

    def problems(self) -> list[str]:
        """Human-readable reasons it did not pass."""
        lines = [f"missing SR: {', '.join(self.sr_missing)}"] if self.sr_missing else []
        lines += [f"doubled SR: {', '.join(self.sr_doubled)}"] if self.sr_doubled else []
        lines += [f"job unfinished: {j}" for j in self.jobs_unfinished] + [f"job failed: {j}" for j in self.jobs_failed]
        lines += [f"instance lost: {i}" for i in self.instances_lost] + [f"harness: {p}" for p in self.harness_problems]
        if self.settle_s is None:
            lines.append(f"never came to rest within the wait (see {self.workdir})")
        elif self.settle_s > self.settle_limit_s:
            lines.append(f"settle {self.settle_s:.1f}s > {self.settle_limit_s:.0f}s")
        return lines

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed, "problems": self.problems()}


def seed_priors(stack: LocalStack, cohort: Cohort) -> None:
    """The patients' history, straight into the PACS with an AE title it does not route to the node."""
    report = send(Peer("127.0.0.1", stack.orthanc.dicom_port, stack.orthanc.aet), list(cohort.priors), ARCHIVE_LOADER_AE)
    if report.failed or report.sent != len(cohort.priors):
        raise RuntimeError(f"seeding the PACS failed: {report.failed}\nOrthanc's log ends:\n{stack.orthanc.log_tail()}")


def wait_workers_ready(stack: LocalStack, timeout: float = 90.0) -> None:
    """Celery logs "<name> ready." once it consumes: the control run starts on warm workers too."""
    deadline = time.monotonic() + timeout
    for name in (n for n in stack.processes if n.startswith("worker-")):
        log = stack.workdir / f"{name}.log"
        while not (log.exists() and " ready." in log.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready after {timeout:.0f}s (see {log})")
            time.sleep(0.2)


class MidTransferWatch:
    """Watches the index's instance count of the multi-instance study while its first
    association runs through the throttled relay."""

    def __init__(self, db: NodeDb, study: Study, timeout: float = 60.0) -> None:
        self.db, self.study, self.timeout = db, study, timeout
        self.half = math.ceil(len(study.files) / 2)
        self.missed = False

    def stored(self) -> str:
        return f"{self.db.instance_count(self.study.study_uid)}/{len(self.study.files)}"

    def wait_half(self) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            count = self.db.instance_count(self.study.study_uid)
            if count >= len(self.study.files):
                self.missed = True
                return "missed: the whole study was stored before the kill"
            if count >= self.half:
                return f"{count}/{len(self.study.files)} instances in the index when the kill was sent"
            time.sleep(0.02)
        self.missed = True
        return f"missed: fewer than {self.half} instances arrived within {self.timeout:.0f}s"


def run_fault(fault: Fault, services: Services, t0: float, record: FaultRecord, locks: dict[str, threading.Lock],
              watch: MidTransferWatch) -> None:
    """At the planned moment: take the target down, wait, start it again (times into `record`)."""
    _sleep_until(t0 + fault.at_s)
    with locks[fault.target]:  # faults of one target never overlap
        if fault.kind == "kill_mid_transfer":
            record.note = watch.wait_half()
        record.down_s = round(time.monotonic() - t0, 2)
        services.kill(fault.target)
        if fault.kind == "kill_mid_transfer":
            record.note += f"; {watch.stored()} stored once it was dead"
        time.sleep(fault.down_s)
        services.restart(fault.target)
        record.up_s = round(time.monotonic() - t0, 2)


def run_once(workdir: Path, cohort: Cohort, plan: FaultPlan, config: RunConfig | None = None) -> Outcome:
    """One whole run: a fresh stack, the priors in the PACS, the studies arriving, the faults,
    then the wait for rest and the checks."""
    config = config or RunConfig()
    outcome = Outcome(plan.label, len(cohort.studies), settle_limit_s=config.settle_limit_s, workdir=str(workdir))
    stack = LocalStack(workdir, Ports.free(), extra_env=dict(config.extra_env))
    proxy = None
    try:
        stack.start()
        seed_priors(stack, cohort)
        wait_workers_ready(stack)
        db = NodeDb(stack.workdir / "node" / "index.db")
        multi_bytes = sum(p.stat().st_size for p in cohort.multi.files)
        proxy = ThrottledProxy(stack.ports.node, rate=multi_bytes / config.transfer_s)
        t0 = _drive(stack, cohort, plan, config, db, proxy, outcome)
        _verdict(stack, cohort, config, db, outcome, t0)
    finally:
        if proxy is not None:
            proxy.close()
        stack.stop()
        reap_zombie_children()
        outcome.logs = log_summary(workdir)
    return outcome


def _drive(stack: LocalStack, cohort: Cohort, plan: FaultPlan, config: RunConfig, db: NodeDb,
           proxy: ThrottledProxy, outcome: Outcome) -> float:
    """The modality sends every study (the multi-instance one over the slow link) while the faults
    run; returns the start of the run (monotonic), which every offset in the outcome counts from."""
    services = Services(stack)
    locks = {name: threading.Lock() for name in (*KILLABLE, "orthanc")}
    watch = MidTransferWatch(db, cohort.multi)
    outcome.faults = [FaultRecord(f) for f in plan.faults]
    log = stack.workdir / "storescu.log"
    t0 = time.monotonic()
    send_deadline = t0 + config.send_deadline_s
    with ThreadPoolExecutor(max_workers=len(cohort.studies) + len(plan.faults) + 1) as pool:
        sends = [pool.submit(send_until_accepted, s, proxy.port if s is cohort.multi else stack.ports.node,
                             t0, send_deadline, log) for s in cohort.studies]
        faults = [pool.submit(run_fault, r.fault, services, t0, r, locks, watch) for r in outcome.faults]
        for future in faults:
            future.result()  # a fault that could not restart its process is a harness error: raise
        outcome.transfers = [future.result() for future in sends]
    if any(r.fault.kind == "kill_mid_transfer" for r in outcome.faults) and watch.missed:
        outcome.harness_problems.append("the mid-transfer kill missed the transfer: " + next(
            r.note for r in outcome.faults if r.fault.kind == "kill_mid_transfer"))
    unsent = [t.study for t in outcome.transfers if t.accepted_s is None]
    if unsent:
        outcome.harness_problems.append(f"never acknowledged by the node: {', '.join(unsent)}")
    outcome.last_accepted_s = max((t.accepted_s for t in outcome.transfers if t.accepted_s is not None), default=None)
    outcome.last_fault_end_s = max((r.up_s for r in outcome.faults if r.up_s is not None), default=None)
    return t0


def _verdict(stack: LocalStack, cohort: Cohort, config: RunConfig, db: NodeDb, outcome: Outcome, t0: float) -> None:
    """Wait for rest (every fault is over and every study acknowledged by now), then check."""
    # Settle time counts from the last fault's end; in the control run, from the last study acknowledged.
    reference = outcome.last_fault_end_s if outcome.last_fault_end_s is not None else outcome.last_accepted_s or 0.0
    pacs = PacsReports(stack)
    rest_at, snapshot = wait_for_rest(db, pacs, cohort, time.monotonic() + config.max_wait_s, config.quiet_s)
    if rest_at is not None:
        outcome.settle_s = round(max(0.0, rest_at - t0 - reference), 2)
        outcome.processing_s = round(rest_at - t0 - min(s.arrival_s for s in cohort.studies), 2)
    reports = snapshot.reports if snapshot.reports is not None else (pacs.poll() or {})
    check_reports(cohort, reports, outcome)
    check_jobs(cohort, snapshot, outcome)
    for study in cohort.studies:
        outcome.instances_lost += [f"{study.label}: {uid}" for uid in db.lost_instances(study)]


def check_reports(cohort: Cohort, reports: dict[str, list[NodeReport]], outcome: Outcome) -> None:
    for study in cohort.studies:
        status = report_status(reports.get(study.study_uid, []))
        if status == "once":
            outcome.sr_once += 1
        else:
            (outcome.sr_missing if status == "missing" else outcome.sr_doubled).append(study.label)


def check_jobs(cohort: Cohort, snapshot: Snapshot, outcome: Outcome) -> None:
    labels = {s.study_uid: s.label for s in cohort.studies}
    for _, study_uid, state, last_error in snapshot.jobs:
        line = f"{labels.get(study_uid, study_uid)}: {state}" + (f" ({last_error[:300]})" if last_error else "")
        if state == "failed":
            outcome.jobs_failed.append(line)
        elif state not in FINAL_JOB_STATES:
            outcome.jobs_unfinished.append(line)


def log_summary(workdir: Path) -> dict[str, dict]:
    """Per log file of the stack: error and warning lines, tracebacks, and the commonest error events."""
    summary = {}
    for log in sorted(workdir.glob("**/*.log")):
        counts: Counter = Counter()
        events: Counter = Counter()
        for line in log.read_text(errors="replace").splitlines():
            if "Traceback" in line:
                counts["tracebacks"] += 1
            level, event = _level_and_event(line)
            if level in ("error", "critical", "warning"):
                counts["errors" if level != "warning" else "warnings"] += 1
                if level != "warning":
                    events[event] += 1
        if counts:
            summary[str(log.relative_to(workdir))] = {**counts, "error_events": dict(events.most_common(8))}
    return summary


def _level_and_event(line: str) -> tuple[str, str]:
    if line.startswith("{"):
        try:
            record = json.loads(line)
            detail = record.get("reason") or record.get("error") or ""
            text = f"{record.get('event', '')} {str(detail)[:160]}".replace("\n", " ").strip()
            return str(record.get("level", "")), text
        except ValueError:
            pass
    for level in ("ERROR", "CRITICAL", "WARNING"):
        if f"{level}/" in line or f" {level} " in line or line.startswith(f"{level}:"):
            return level.lower(), line[-200:]
    return "", ""
