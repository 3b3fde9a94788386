"""No-prior arm: accuracy and speed of comparison against a library of normal references (issue 17).

A library of synthetic normal chest radiographs of different people (anatomy, positioning,
exposure) is imported through the real library code (de-identified, indexed); query patients
that the library does not contain, half with a nodule of --min-mm..--max-mm and half normal, are
matched by the selection rules and compared with compare_with_references.

Targets: sensitivity >= 0.8 for nodules >= 12 mm; <= 0.5 false regions per normal query; a
library of >= 20 normals; a 1024 x 1024 query against 5 references in < 5 s. The time is also
printed as a ratio to a prior comparison of one 1024 x 1024 pair measured in the same run.

    .venv/bin/python benchmarks/reference_accuracy.py [--library 20] [--queries 10] [--size 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dicom_node.references import Library, query_for, select_references  # noqa: E402
from dicom_node.references.use import load_references  # noqa: E402
from inference.pixels import image_from_dataset  # noqa: E402
from inference.reference_phantoms import make_normal_library, make_query  # noqa: E402
from inference.references import compare_with_references  # noqa: E402

_KEYS = ("PatientSex", "PatientAge", "PatientBirthDate", "StudyDate")


def _library(root: Path, n: int, size: int) -> Library:
    src = root / "src"
    src.mkdir()
    paths = []
    for i, ds in enumerate(make_normal_library(n, size)):
        paths.append(src / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    lib = Library(root / "lib")
    report = lib.add(paths, attested_normal=True, attested_by="benchmark")
    assert len(report.added) == n, report
    return lib


def _compare(lib: Library, ds, count: int):
    image = image_from_dataset(ds)
    selection = select_references(lib.records(), query_for(image, {k: str(ds.get(k, "")) for k in _KEYS}), count)
    images, uses = load_references(lib, selection)
    t0 = time.perf_counter()
    result = compare_with_references(image, images, uses, with_overlay=False)
    return result, time.perf_counter() - t0


def _hit(region, truth, margin: int) -> bool:
    r, c = truth.center
    return (region.bbox[0] - margin <= r <= region.bbox[2] + margin
            and region.bbox[1] - margin <= c <= region.bbox[3] + margin)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", type=int, default=20, help="normals in the library")
    ap.add_argument("--queries", type=int, default=10, help="queries per arm (nodule / normal)")
    ap.add_argument("--size", type=int, default=512, help="pixels per side of the accuracy images")
    ap.add_argument("--count", type=int, default=5, help="references selected per query")
    ap.add_argument("--min-mm", type=float, default=12.0)
    ap.add_argument("--max-mm", type=float, default=25.0)
    ap.add_argument("--timing-runs", type=int, default=3, help="1024 x 1024 runs (0: skip timing)")
    args = ap.parse_args()
    ok = no_prior_arm(args.library, args.queries, args.size, args.count, args.min_mm, args.max_mm, args.timing_runs)
    return 0 if ok else 1


def no_prior_arm(library: int = 20, queries: int = 10, size: int = 512, count: int = 5, min_mm: float = 12.0,
                 max_mm: float = 25.0, timing_runs: int = 3) -> bool:
    """Prints the no-prior table; True when every target is met (also change_accuracy.py's no-prior arm)."""
    args = argparse.Namespace(library=library, queries=queries, size=size, count=count, min_mm=min_mm,
                              max_mm=max_mm, timing_runs=timing_runs)
    rng = np.random.default_rng(17)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = _library(Path(tmp), args.library, args.size)
        margin = max(2, args.size // 256)
        for i in range(args.queries):
            mm = float(rng.uniform(args.min_mm, args.max_mm))
            q = make_query(i, mm, args.size)
            result, secs = _compare(lib, q.dataset, args.count)
            hit = [r for r in result.regions if _hit(r, q.nodule, margin)]
            rows.append(("nodule", mm, bool(hit), len(result.regions) - len(hit), secs))
            n = make_query(args.queries + i, None, args.size)
            result, secs = _compare(lib, n.dataset, args.count)
            rows.append(("normal", 0.0, False, len(result.regions), secs))
            print(f"query {i}: nodule {mm:4.1f} mm {'found' if hit else 'MISSED'} "
                  f"(+{rows[-2][3]} other), normal query: {rows[-1][3]} false region(s)", flush=True)

        nod = [r for r in rows if r[0] == "nodule"]
        nor = [r for r in rows if r[0] == "normal"]
        sensitivity = sum(r[2] for r in nod) / len(nod)
        false_per_normal = sum(r[3] for r in nor) / len(nor)
        print()
        print(f"library {args.library} normals, {len(nod)} nodule queries ({args.min_mm:.0f}-{args.max_mm:.0f} mm), "
              f"{len(nor)} normal queries, {args.size} px, {args.count} references each")
        print(f"{'metric':36} {'measured':>9} {'target':>9}  ok")
        print(f"{'sensitivity (nodules >= 12 mm)':36} {sensitivity:9.2f} {'>= 0.80':>9}  {'yes' if sensitivity >= 0.8 else 'NO'}")
        print(f"{'false regions per normal query':36} {false_per_normal:9.2f} {'<= 0.50':>9}  {'yes' if false_per_normal <= 0.5 else 'NO'}")
        print(f"{'other regions per nodule query':36} {sum(r[3] for r in nod) / len(nod):9.2f}")
        print(f"{'seconds per query ({} px)'.format(args.size):36} {statistics.median(r[4] for r in rows):9.2f}")

        ok = sensitivity >= 0.8 and false_per_normal <= 0.5 and args.library >= 20
        if args.timing_runs:
            import inference
            from inference.phantoms import make_chest_pair

            big = Path(tmp) / "big"
            big.mkdir()
            lib_big = _library(big, args.count, 1024)
            q = make_query(0, 15.0, 1024)
            times = [_compare(lib_big, q.dataset, args.count)[1] for _ in range(args.timing_runs)]
            pair = make_chest_pair(5, "new_nodule", 1024)
            cur, pri = image_from_dataset(pair.current), image_from_dataset(pair.prior)
            prior_times = []
            for _ in range(args.timing_runs):
                t0 = time.perf_counter()
                inference.compare(cur, [pri], with_overlay=False)
                prior_times.append(time.perf_counter() - t0)
            t, tp = statistics.median(times), statistics.median(prior_times)
            print(f"{'1024 px query vs 5 references, s':36} {t:9.2f} {'< 5.00':>9}  {'yes' if t < 5 else 'NO'}")
            print(f"{'  ratio to one 1024 px prior pair':36} {t / tp:9.2f}   (prior pair {tp:.2f} s, same run)")
            ok = ok and t < 5
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
