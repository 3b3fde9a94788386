"""`dicom-node quickstart`: the whole product on this machine, end to end, in one command."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..index import Index
from ..pipeline.jobs import JobStore
from .orthanc import require_private_network
from .scenario import acquire, describe, seed_pacs, wait_for_report, write_history
from .stack import PIDFILE, LocalStack, stop_from_pidfile


def stop(workdir: Path, timeout: float = 30.0) -> list[str]:
    """Stop every process an earlier quickstart started; waits until they are gone."""
    stopped = stop_from_pidfile(workdir)
    deadline = time.monotonic() + timeout
    for pid in stopped.values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, 9)
    return list(stopped)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def finished_job(workdir: Path, study_uid: str, timeout: float = 15.0) -> dict | None:
    """The node's job record for the study, once its last stage has been recorded."""
    index = Index(f"sqlite:///{workdir / 'node' / 'index.db'}")
    try:
        store = JobStore(index)
        deadline = time.monotonic() + timeout
        while True:
            jobs = store.for_study(study_uid)
            if (jobs and jobs[-1].finished) or time.monotonic() > deadline:
                return jobs[-1].__dict__ if jobs else None
            time.sleep(0.3)
    finally:
        index.dispose()


def run(workdir: Path, change: str = "new_nodule", timeout: float = 170.0, echo=print) -> str:
    require_private_network()
    if stop(workdir):
        echo("stopped the previous quickstart run")
    shutil.rmtree(workdir, ignore_errors=True)
    started = time.monotonic()
    echo("starting Redis, Orthanc (the PACS), the node and its io/gpu workers on loopback ...")
    stack = LocalStack(workdir, supervise_workers=True).start()  # a worker that exits or hangs is restarted
    scenario = write_history(workdir / "data", change)
    echo("seeding the PACS with the patient's history (4 prior studies, one with a report, and a namesake) ...")
    seed_pacs(stack.orthanc, scenario)
    echo(f"acquiring a new chest PA study ({change.replace('_', ' ')}); the PACS routes it to the node when stable ...")
    acquire(stack.orthanc, scenario)
    sr = wait_for_report(stack.orthanc, scenario.current_study_uid, timeout)
    job = finished_job(workdir, scenario.current_study_uid)
    priors_file = workdir / "node" / "jobs" / (job["job_key"] if job else "") / "priors.json"
    priors = json.loads(priors_file.read_text()) if job and priors_file.exists() else None
    pids = json.loads((workdir / PIDFILE).read_text())
    summary = describe(scenario, sr, job, priors)
    return "\n".join([
        summary,
        f"Done in {time.monotonic() - started:.0f} s.",
        "Where to look (the services listen on loopback inside this quickstart's own network namespace):",
        f"  Orthanc:  sudo nsenter --net=/proc/{pids['orthanc']}/ns/net curl -s http://127.0.0.1:{stack.ports.orthanc_http}/studies",
        f"  Orthanc web UI inside the namespace: http://127.0.0.1:{stack.ports.orthanc_http}/app/explorer.html",
        f"  Node:     sudo nsenter --net=/proc/{pids['node']}/ns/net curl -s http://127.0.0.1:{stack.ports.http}/status",
        f"  Logs:     {workdir}/*.log",
        "Stop everything: scripts/quickstart.sh --stop   (or: dicom-node quickstart --stop)",
    ])
