"""Acceptance benchmark: the whole node through crashes, a PACS outage and a torn transfer.

    python benchmarks/chaos.py --seeds 1 2 3 4 5 [--studies 16] [--out results.json]

Per seed, a fresh local stack on loopback (Redis with AOF, Orthanc as the PACS, `dicom-node
serve`, one io and one gpu worker, each its own process group); every patient's prior seeded
into Orthanc; the current studies (--studies, from at least --patients patients, one of them a
DX study of --instances images) sent to the node by DCMTK storescu one every 1-3 s; and, at
seeded moments, kill -9 of the SCP, the io worker, the gpu worker and Redis (each restarted
after 1-5 s), one PACS outage (--pacs-outage s), and the SCP killed half-way through the
multi-instance study's association (the modality then resends the whole study until it is
acknowledged). The fault plan is printed first, so that a run can be reproduced with --seed.

Then it waits (at most --max-wait s) until the node is at rest and checks, per study: exactly
one current SR of the node in the PACS (several only as a revision chain naming predecessors),
no job unfinished or failed (final states: done, superseded), no acknowledged instance missing
from the index or its file, nothing done by a human, and the settle time (last fault's end to
rest) at most --settle-limit s. A control run with the same studies and no faults comes first:
the reference for the processing time. Exits 1 if any run fails.

Runs itself in a private network namespace with loopback only (Orthanc binds 0.0.0.0). The
stack's logs stay in the printed work folder (node.log, worker-*.log, redis/, orthanc/,
storescu.log).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.local_stack.orthanc import run_in_private_network  # noqa: E402
from tests.support.chaos import (  # noqa: E402
    CONTROL,
    Cohort,
    FaultPlan,
    Outcome,
    RunConfig,
    make_cohort,
    plan_faults,
    run_once,
    set_child_subreaper,
)

COLUMNS = ("seed", "studies", "SR exactly once", "missing SR", "doubled", "jobs unfinished/failed",
           "instances lost", "settle s", "total s (x control)", "pass")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[], help="fault-plan seeds, one run each")
    parser.add_argument("--seed", type=int, action="append", default=[], help="one more seed (repeatable)")
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--instances", type=int, default=12, help="images in the multi-instance study")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels")
    parser.add_argument("--cohort-seed", type=int, default=0, help="the studies and their arrival times (same in every run)")
    parser.add_argument("--pacs-outage", type=float, default=20.0, help="seconds; 0: none")
    parser.add_argument("--max-wait", type=float, default=180.0, help="seconds to wait for rest after the last fault")
    parser.add_argument("--settle-limit", type=float, default=60.0)
    parser.add_argument("--no-control", action="store_true", help="skip the control run")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra DICOM_NODE_* setting for every node process (repeatable)")
    parser.add_argument("--workdir", type=Path, help="default: a new folder under var/")
    parser.add_argument("--out", type=Path, help="write every outcome as JSON here")
    args = parser.parse_args()
    args.seeds = [*args.seeds, *args.seed] or [1]
    return args


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if value is not None and reference else "n/a"


def row(outcome: Outcome, control: Outcome | None) -> tuple[str, ...]:
    total = "n/a" if outcome.processing_s is None else f"{outcome.processing_s:.1f}"
    return (outcome.label, str(outcome.studies), str(outcome.sr_once), str(len(outcome.sr_missing)),
            str(len(outcome.sr_doubled)), f"{len(outcome.jobs_unfinished)}/{len(outcome.jobs_failed)}",
            str(len(outcome.instances_lost)), "n/a" if outcome.settle_s is None else f"{outcome.settle_s:.1f}",
            f"{total} ({ratio(outcome.processing_s, control.processing_s if control else None)})",
            "yes" if outcome.passed else "NO")


def print_table(outcomes: list[Outcome], control: Outcome | None) -> None:
    rows = [COLUMNS, *(row(o, control) for o in outcomes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for number, cells in enumerate(rows):
        print(" | ".join(cell.rjust(width) for cell, width in zip(cells, widths)))
        if number == 0:
            print("-+-".join("-" * width for width in widths))


def print_details(outcome: Outcome) -> None:
    print(f"\nrun {outcome.label}: {'pass' if outcome.passed else 'FAIL'}  (logs in {outcome.workdir})")
    for record in outcome.faults:
        print(f"  {record.fault.describe()}: down at {record.down_s}s, up at {record.up_s}s {record.note}".rstrip())
    resent = [f"{t.study} x{t.attempts}" for t in outcome.transfers if t.attempts > 1]
    if resent:
        print(f"  resent by the modality: {', '.join(resent)}")
    for line in outcome.problems():
        print(f"  - {line}")
    for log, counts in outcome.logs.items():
        if counts.get("errors") or counts.get("tracebacks"):
            events = "; ".join(f"{n}x {e}" for e, n in counts.get("error_events", {}).items())
            print(f"  {log}: {counts.get('errors', 0)} errors, {counts.get('tracebacks', 0)} tracebacks  {events}")


def run_all(args: argparse.Namespace, cohort: Cohort, plans: list[FaultPlan], root: Path) -> list[Outcome]:
    extra_env = dict(item.split("=", 1) for item in args.env)
    config = RunConfig(max_wait_s=args.max_wait, settle_limit_s=args.settle_limit, extra_env=extra_env)
    outcomes = []
    for plan in plans:
        print(f"\n=== run {plan.label} ({time.strftime('%H:%M:%S')})", flush=True)
        try:
            outcome = run_once(root / f"run-{plan.label}", cohort, plan, config)
        except Exception as exc:  # the harness itself broke (a process would not start): report it, go on
            outcome = Outcome(plan.label, len(cohort.studies), harness_problems=[f"{type(exc).__name__}: {exc}"],
                              workdir=str(root / f"run-{plan.label}"))
        print_details(outcome)
        outcomes.append(outcome)
    return outcomes


def main() -> int:
    args = parse_args()
    run_in_private_network()
    set_child_subreaper(True)  # orphans of killed process groups come back to us to be reaped
    (REPO / "var").mkdir(exist_ok=True)
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="chaos-", dir=REPO / "var"))).resolve()
    print(f"work folder: {root}")
    cohort = make_cohort(root / "data", args.cohort_seed, args.studies, args.patients, args.instances, args.size)
    print("cohort:", cohort.describe())
    plans = [] if args.no_control else [CONTROL]
    plans += [plan_faults(seed, cohort, pacs_outage_s=args.pacs_outage) for seed in args.seeds]
    for plan in plans:
        print(plan.describe())
    outcomes = run_all(args, cohort, plans, root)
    control = next((o for o in outcomes if o.label == "control"), None)
    print()
    print_table(outcomes, control)
    if args.out:
        args.out.write_text(json.dumps({"cohort": cohort.describe(), "runs": [o.to_json() for o in outcomes]},
                                       indent=2, default=str))
        print(f"\nwrote {args.out}")
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
