"""End-to-end pipeline throughput and latency, with one and with two worker processes per queue.

    python benchmarks/pipeline.py [--studies 50] [--size 512] [--workers 1 2]

For each worker count: a fresh local stack (Redis, Orthanc as the PACS, the node, workers),
every patient's prior seeded into Orthanc, then the current studies sent to the node over
C-STORE, all at once (a burst: throughput). Then, with one worker per queue, the same studies
one every --interval seconds (steady load: latency). Prints studies/minute end to end and
p50/p95 latencies per stage, from the last instance received to the SR accepted by Orthanc. Runs itself in a private network
namespace (Orthanc binds 0.0.0.0), as the tests do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import select  # noqa: E402

from dicom_node.index import Index, studies  # noqa: E402
from dicom_node.local_stack.orthanc import run_in_private_network  # noqa: E402
from dicom_node.local_stack.scenario import ARCHIVE_LOADER_AE  # noqa: E402
from dicom_node.local_stack.stack import MODALITY_AE, NODE_AE, LocalStack, Ports  # noqa: E402
from dicom_node.pipeline.jobs import JobStore  # noqa: E402
from dicom_node.report.delivery import report_deliveries  # noqa: E402
from dicom_node.scu import Peer, send  # noqa: E402


def make_studies(folder: Path, count: int, size: int) -> tuple[list[Path], list[Path]]:
    from inference.phantoms import CHEST_CHANGES, PatientInfo, make_chest_pair

    priors, currents = [], []
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        patient = PatientInfo(patient_id=f"BENCH-{n:04d}", current_date=date(2026, 11, 1), prior_date=date(2025, 11, 1),
                              current_accession=f"BC{n:05d}", prior_accession=f"BP{n:05d}")
        pair = make_chest_pair(1000 + n, CHEST_CHANGES[n % len(CHEST_CHANGES)], size=size, patient=patient)
        for label, ds, out in (("prior", pair.prior, priors), ("current", pair.current, currents)):
            path = folder / f"{label}-{n:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.append(path)
    return priors, currents


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (a Celery worker and its pool)."""
    total = 0.0
    for child in [pid, *map(int, subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())]:
        try:
            with open(f"/proc/{child}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            continue
    return total


def worker_rss(stack: LocalStack) -> dict[str, float]:
    return {name: round(tree_rss_mb(proc.pid)) for name, proc in stack.processes.items() if name.startswith("worker-gpu")}


def percentiles(values: list[float]) -> str:
    if not values:
        return "      n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return f"{statistics.median(ordered):6.2f} / {p95:6.2f}"


def run(workdir: Path, workers: int, priors: list[Path], currents: list[Path], timeout: float, interval: float = 0.0) -> dict:
    stack = LocalStack(workdir, Ports.free(), study_idle_seconds=1.0).start(io_workers=workers, gpu_workers=workers)
    try:
        report = send(Peer("127.0.0.1", stack.orthanc.dicom_port, stack.orthanc.aet), priors, ARCHIVE_LOADER_AE)
        assert not report.failed, report.failed
        started = time.time()
        # One association per study, as modalities send them.
        for path in currents:
            assert send(Peer("127.0.0.1", stack.ports.node, NODE_AE), [path], MODALITY_AE).sent == 1
            time.sleep(interval)  # 0: a burst (throughput); > 0: steady arrivals (latency)
        index = Index(f"sqlite:///{workdir / 'node' / 'index.db'}")
        jobs = JobStore(index)
        deadline = time.time() + timeout
        rss_after_first: dict[str, float] = {}
        while time.time() < deadline:
            finished = [j for j in jobs.list(limit=10_000) if j.finished]
            if finished and not rss_after_first:
                rss_after_first = worker_rss(stack)
            if len(finished) >= len(currents):
                break
            time.sleep(1)
        rss_at_end = worker_rss(stack)
        with index.engine.connect() as conn:
            received = dict(conn.execute(select(studies.c.study_uid, studies.c.last_received_at)).all())
            completed = dict(conn.execute(select(studies.c.study_uid, studies.c.completed_at)).all())
            accepted = dict(conn.execute(select(report_deliveries.c.study_uid, report_deliveries.c.accepted_at)).all())
        all_jobs = jobs.list(limit=10_000)
        index.dispose()
    finally:
        stack.stop()
    done = [j for j in all_jobs if j.state == "done" and accepted.get(j.study_uid)]
    stage = {name: [j.timings[name]["finished"] - j.timings[name]["started"] for j in done if "finished" in j.timings.get(name, {})]
             for name in ("priors", "compare", "deliver")}
    end = max((accepted[j.study_uid] for j in done), default=time.time())
    return {
        "label": f"{workers}" + (f" paced {interval:g}s" if interval else " burst"),
        "workers": workers,
        "done": len(done),
        "failed": sum(j.state == "failed" for j in all_jobs),
        "per_minute": 60 * len(done) / (end - started) if done else 0.0,
        "received_to_accepted": [accepted[j.study_uid] - received[j.study_uid] for j in done],
        "completed_to_accepted": [accepted[j.study_uid] - completed[j.study_uid] for j in done if completed.get(j.study_uid)],
        "queue_wait": [j.timings["priors"]["started"] - completed[j.study_uid] for j in done if completed.get(j.study_uid)],
        "rss": (rss_after_first, rss_at_end),
        **stage,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--interval", type=float, default=2.0,
                        help="also run 1 worker/queue with one study every INTERVAL seconds (latency at steady load); 0: skip")
    args = parser.parse_args()
    run_in_private_network()
    Path("var").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir="var"))
    priors, currents = make_studies(root / "data", args.studies, args.size)
    results = [run(root / f"stack-{w}", w, priors, currents, args.timeout) for w in args.workers]
    if args.interval:
        results.append(run(root / "stack-paced", args.workers[0], priors, currents, args.timeout, args.interval))
    print(f"\n{args.studies} studies ({args.size}x{args.size} chest radiographs, prior in Orthanc), analysis engine only, {os.cpu_count()} CPUs")
    print(f"{'workers/queue':>17} {'done':>5} {'failed':>6} {'studies/min':>11}  {'p50 / p95 seconds':>56}")
    print(f"{'':17} {'':5} {'':6} {'':11}  {'received->SR accepted':>22} {'completed->accepted':>20} {'queue wait':>16}")
    for r in results:
        print(f"{r['label']:>17} {r['done']:5d} {r['failed']:6d} {r['per_minute']:11.1f}  "
              f"{percentiles(r['received_to_accepted']):>22} {percentiles(r['completed_to_accepted']):>20} {percentiles(r['queue_wait']):>16}")
    print("\nper-stage seconds, p50 / p95:")
    for r in results:
        print(f"  {r['label']}: " + "  ".join(f"{s} {percentiles(r[s])}" for s in ("priors", "compare", "deliver")))
    print("\ngpu worker RSS (MiB, worker + pool) after the first job -> after the last:")
    for r in results:
        first, last = r["rss"]
        print(f"  {r['label']}: " + ", ".join(f"{name} {first.get(name, 0):.0f} -> {last.get(name, 0):.0f}" for name in last))
    bursts = [r for r in results if "burst" in r["label"]]
    if len(bursts) > 1 and bursts[0]["per_minute"]:
        print(f"\nthroughput ratio {bursts[-1]['workers']} vs {bursts[0]['workers']} workers: {bursts[-1]['per_minute'] / bursts[0]['per_minute']:.2f}")
    subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()
