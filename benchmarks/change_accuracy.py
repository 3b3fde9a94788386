"""Accuracy, sanity-gate and speed benchmark of the embedded comparative analyzer on generated pairs.

    python benchmarks/change_accuracy.py [--pairs 216] [--size 512] [--histories 80] [--timing-pairs 8]
        [--timing-size 2048] [--registration affine|bspline] [--no-prior-queries 10] [--no-prior-library 20]

Histories: `--histories` patients with 2 or 3 visits, each a nodule growing, shrinking, new,
resolved or stable, under each perturbation class of the priors (inference.phantoms.PERTURBATIONS:
strong exposure/gamma, deeper inspiration, another detector resolution, MONOCHROME1, a lossy
JPEG 2000 prior, two changes at once, 6-9 mm nodules); measured are false regions, sensitivity,
each visit's lesion size against the truth and the trend. Timing uses a current with two priors.

Accuracy runs on `--pairs` chest radiograph pairs of `--size` px (all change classes
and stable repositioned pairs, equally many), plus `--ct-pairs` small CT volume
pairs; the sanity gate on corrupted copies of valid pairs; speed and peak memory on
`--timing-pairs` pairs of `--timing-size` px, loaded from DICOM files in a fresh
child process so its peak RSS is the analysis alone (decode + compare).

No-prior arm (`--no-prior-queries`): patients without a prior, half with a 12-25 mm nodule and half
normal, none of them in a generated library of `--no-prior-library` normals, compared against their
matched references (reference_accuracy.py, which also times a 1024 px query against 5 references).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import compare  # noqa: E402
from inference.phantoms import (  # noqa: E402
    CHEST_CHANGES,
    CT_CHANGES,
    HISTORY_TRAJECTORIES,
    PERTURBATIONS,
    TREND_OF,
    make_chest_history,
    make_chest_pair,
    make_ct_pair,
)
from inference.pixels import image_from_dataset, load_image, volume_from_datasets  # noqa: E402

TARGETS = {
    "sensitivity >= 10 mm": 0.95,
    "false regions per stable pair": 0.1,
    "extra regions per changed pair": 0.25,
    "sizes within 25 % or 2 mm": 0.90,
    "trend right": 0.90,
    "change status right": 0.85,
    "seconds, 2048 current with two priors": 3.0,
    "peak RSS MB": 2048,
}
DEFORMABLE = False  # --registration bspline sets it


def iou(a, b) -> float:
    n = len(a) // 2
    inter = 1.0
    for k in range(n):
        lo, hi = max(a[k], b[k]), min(a[k + n], b[k + n])
        if hi <= lo:
            return 0.0
        inter *= hi - lo
    va = np.prod([a[k + n] - a[k] for k in range(n)])
    vb = np.prod([b[k + n] - b[k] for k in range(n)])
    return float(inter / (va + vb - inter))


def match(truth_regions, found, mm_per_px: float):
    """Greedy: each truth region takes the overlapping found region with the best IoU; a found region
    whose centre lies within the truth box also counts (thin/irregular shapes have low box IoU)."""
    pairs, used = [], set()
    for t in truth_regions:
        best, best_i = None, -1.0
        for j, f in enumerate(found):
            if j in used:
                continue
            box = f.bbox_3d if f.bbox_3d is not None and len(t.bbox) == 6 else f.bbox
            v = iou(t.bbox, box)
            n = len(box) // 2
            centre = [(box[k] + box[k + n]) / 2 for k in range(n)]
            inside = all(t.bbox[k] - 2 <= centre[k] <= t.bbox[k + n] + 2 for k in range(n))
            if (v > 0.05 or inside) and v > best_i:
                best, best_i = j, v
        if best is not None:
            used.add(best)
            pairs.append((t, found[best], best_i))
        else:
            pairs.append((t, None, 0.0))
    false = [f for j, f in enumerate(found) if j not in used]
    return pairs, false


def run_accuracy(n_pairs: int, size: int, seed0: int):
    per_class = defaultdict(lambda: {"truth": 0, "hit": 0, "found": 0, "false": 0, "status_ok": 0, "zone_ok": 0,
                                     "iou": [], "diam_err": []})
    big = {"truth": 0, "hit": 0}
    small = {"truth": 0, "hit": 0}
    stable_pairs, stable_false, secs = 0, 0, []
    for i in range(n_pairs):
        change = CHEST_CHANGES[i % len(CHEST_CHANGES)]
        pair = make_chest_pair(seed0 + i, change, size, monochrome1=(i % 7 == 3))
        cur, pri = image_from_dataset(pair.current, f"cur{i}"), image_from_dataset(pair.prior, f"pri{i}")
        res = compare(cur, [pri], with_overlay=False, deformable=DEFORMABLE)
        secs.append(res.seconds)
        c = per_class[change]
        pairs, false = match(pair.truth.regions, res.regions, cur.spacing_mm[0])
        if os.environ.get("BENCH_VERBOSE"):
            for f in false:
                print(f"  false region: pair {i} ({change}) {f.status} {f.zone} {f.bbox} "
                      f"{f.longest_diameter_mm} mm conf {f.confidence}")
        c["found"] += len(res.regions)
        c["false"] += len(false)
        if change == "stable":
            stable_pairs += 1
            stable_false += len(false)
        for t, f, v in pairs:
            c["truth"] += 1
            bucket = big if t.size_mm >= 10 else small
            bucket["truth"] += 1
            if f is None:
                continue
            c["hit"] += 1
            bucket["hit"] += 1
            c["iou"].append(v)
            c["status_ok"] += int(f.status == t.status)
            c["zone_ok"] += int(f.zone == t.zone)
            if t.kind == "nodule":
                c["diam_err"].append(abs(f.longest_diameter_mm - t.size_mm) / t.size_mm)
    return per_class, big, small, stable_pairs, stable_false, secs


def run_ct(n_pairs: int, seed0: int):
    stats = {"truth": 0, "hit": 0, "status_ok": 0, "false": 0, "stable": 0, "stable_false": 0, "zone_ok": 0}
    for i in range(n_pairs):
        change = CT_CHANGES[i % len(CT_CHANGES)]
        pair = make_ct_pair(seed0 + i, change)
        cur, pri = volume_from_datasets(pair.current), volume_from_datasets(pair.prior)
        res = compare(cur, [pri], with_overlay=False)
        pairs, false = match(pair.truth.regions, res.regions, 1.0)
        stats["false"] += len(false)
        if change == "stable":
            stats["stable"] += 1
            stats["stable_false"] += len(false)
        for t, f, _ in pairs:
            stats["truth"] += 1
            if f is not None:
                stats["hit"] += 1
                stats["status_ok"] += int(f.status == t.status)
                stats["zone_ok"] += int(f.zone.startswith(t.zone))
    return stats


def run_histories(n: int, size: int, seed0: int):
    """n histories: trajectory x visits (2, 3) x perturbation, cycled. Per perturbation class and overall."""
    rows = defaultdict(lambda: defaultdict(float))
    for i in range(n):
        trajectory = HISTORY_TRAJECTORIES[i % len(HISTORY_TRAJECTORIES)]
        visits = 2 + (i // len(HISTORY_TRAJECTORIES)) % 2
        perturbation = PERTURBATIONS[(i // (2 * len(HISTORY_TRAJECTORIES))) % len(PERTURBATIONS)]
        h = make_chest_history(seed0 + i, trajectory, visits, size, perturbation=perturbation)
        images = [image_from_dataset(ds, f"h{i}v{k}") for k, ds in enumerate(h.visits)]
        res = compare(images[-1], images[:-1], with_overlay=False, deformable=DEFORMABLE)
        pairs, false = match(h.truth.regions, res.regions, images[-1].spacing_mm[0])
        for key in (perturbation, "all"):
            r = rows[key]
            r["histories"] += 1
            if os.environ.get("BENCH_VERBOSE") and key == "all":
                for f in false:
                    print(f"  false region: history {i} ({trajectory}, {visits} visits, {perturbation}) {f.status} "
                          f"{f.zone} {f.longest_diameter_mm} mm conf {f.confidence}")
            if trajectory == "stable":
                r["stable"] += 1
                r["stable_false"] += len(false)
            else:
                r["changed"] += 1
                r["changed_extra"] += len(false)
            for t, f, _ in pairs:
                now_mm = max(v for v in t.sizes_mm if v)
                bucket = "big" if now_mm >= 10 else "small"
                r[f"{bucket}_truth"] += 1
                r["trend_total"] += 1
                if os.environ.get("BENCH_VERBOSE") and key == "all":
                    found = "missed" if f is None else f"{f.trend} {[tp.long_axis_mm for tp in f.timepoints]}"
                    print(f"  history {i} ({trajectory}, {visits} visits, {perturbation}) truth {t.sizes_mm}: {found}")
                if f is None:
                    continue
                r[f"{bucket}_hit"] += 1
                r["trend_ok"] += int(f.trend == TREND_OF.get(h.truth.change, t.status) or
                                     (t.status == "new" and f.trend == "new"))
                for truth_mm, tp in zip(t.sizes_mm, f.timepoints):
                    r["presence_total"] += 1
                    r["presence_ok"] += int((truth_mm is not None) == tp.present)
                    if truth_mm is not None and tp.present:
                        r["size_total"] += 1
                        r["size_ok"] += int(abs(tp.long_axis_mm - truth_mm) <= max(0.25 * truth_mm, 2.0))
                        r["size_err"] += abs(tp.long_axis_mm - truth_mm) / truth_mm
    return rows


def history_section(args) -> None:
    print()
    print(f"Histories: {args.histories} patients of 2 or 3 visits ({args.size} px), trajectories "
          f"{', '.join(HISTORY_TRAJECTORIES)}, registration {'bspline' if DEFORMABLE else 'affine'}")
    rows = run_histories(args.histories, args.size, args.seed + 30_000)
    print()
    print("| perturbation | histories | false per stable | extra per changed | sens. >= 10 mm | sens. 6-9 mm | "
          "sizes ok | mean size err | presence ok | trend ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
    for key in [*PERTURBATIONS, "all"]:
        r = rows.get(key)
        if not r:
            continue
        name = f"**{key}**" if key == "all" else key
        print(f"| {name} | {r['histories']:.0f} | {ratio(r['stable_false'], r['stable'])} | "
              f"{ratio(r['changed_extra'], r['changed'])} | {ratio(r['big_hit'], r['big_truth'])} | "
              f"{ratio(r['small_hit'], r['small_truth'])} | {ratio(r['size_ok'], r['size_total'])} | "
              f"{ratio(r['size_err'] * 100, r['size_total'])} % | {ratio(r['presence_ok'], r['presence_total'])} | "
              f"{ratio(r['trend_ok'], r['trend_total'])} |")
    a = rows["all"]
    print()
    print(f"- false regions per stable history: {ratio(a['stable_false'], a['stable'])}  [target <= 0.10]")
    print(f"- extra regions per changed history: {ratio(a['changed_extra'], a['changed'])}  [target <= 0.25]")
    print(f"- sensitivity >= 10 mm: {ratio(a['big_hit'], a['big_truth'])} ({a['big_hit']:.0f}/{a['big_truth']:.0f})"
          f"  [target >= 0.95]; 6-9 mm: {ratio(a['small_hit'], a['small_truth'])} "
          f"({a['small_hit']:.0f}/{a['small_truth']:.0f}; the nodule's largest size at any visit, so a growing or "
          f"shrinking one changes by only 1-4 mm between visits)")
    print(f"- each visit's size within 25 % or 2 mm: {ratio(a['size_ok'], a['size_total'])} "
          f"({a['size_ok']:.0f}/{a['size_total']:.0f})  [target >= 0.90]")
    hits = a['big_hit'] + a['small_hit']
    print(f"- trend right: {ratio(a['trend_ok'], a['trend_total'])} ({a['trend_ok']:.0f}/{a['trend_total']:.0f})"
          f"  [target >= 0.90] (missed findings count as wrong); of the findings detected: "
          f"{ratio(a['trend_ok'], hits)} ({a['trend_ok']:.0f}/{hits:.0f})")


CORRUPTIONS = {
    "laterality": ("laterality_mismatch", lambda c, p: (dataclasses.replace(c, laterality="R"),
                                                        dataclasses.replace(p, laterality="L"))),
    "body part": ("body_part_mismatch", lambda c, p: (c, dataclasses.replace(p, body_part="ABDOMEN"))),
    "modality": ("modality_mismatch", lambda c, p: (c, dataclasses.replace(p, modality="MR"))),
    "flip left-right": ("flipped_or_rotated",
                        lambda c, p: (c, dataclasses.replace(p, pixels=np.ascontiguousarray(p.pixels[:, ::-1])))),
    "flip top-bottom": ("flipped_or_rotated",
                        lambda c, p: (c, dataclasses.replace(p, pixels=np.ascontiguousarray(p.pixels[::-1])))),
    "rotate 90": ("flipped_or_rotated",
                  lambda c, p: (c, dataclasses.replace(p, pixels=np.ascontiguousarray(np.rot90(p.pixels))))),
    "rotate 180": ("flipped_or_rotated",
                   lambda c, p: (c, dataclasses.replace(p, pixels=np.ascontiguousarray(p.pixels[::-1, ::-1])))),
    "view PA vs LAT": ("view_mismatch", lambda c, p: (c, dataclasses.replace(p, view="LL"))),
    "blank prior": ("blank_image", lambda c, p: (c, dataclasses.replace(p, pixels=np.full_like(p.pixels, 1000.0)))),
    "saturated prior": ("saturated_image",
                        lambda c, p: (c, dataclasses.replace(p, pixels=np.where(p.pixels > np.percentile(
                            p.pixels, 20), 4095.0, p.pixels).astype(np.float32)))),
    "duplicate (resent)": ("duplicate", lambda c, p: (c, dataclasses.replace(c, source="resent"))),
    "implausible spacing": ("implausible_spacing",
                            lambda c, p: (c, dataclasses.replace(p, spacing_mm=(25.0, 25.0)))),
}


def run_sanity(n_each: int, size: int, seed0: int):
    from inference.sanity import check_pair

    caught = {k: 0 for k in CORRUPTIONS}
    valid_pairs, false_alarm_blocking, false_alarm_any = 0, 0, 0
    for i in range(n_each):
        change = CHEST_CHANGES[i % len(CHEST_CHANGES)]
        pair = make_chest_pair(seed0 + i, change, size)
        cur, pri = image_from_dataset(pair.current, "c"), image_from_dataset(pair.prior, "p")
        flags = check_pair(cur, pri)
        valid_pairs += 1
        false_alarm_blocking += int(any(f.blocking for f in flags))
        false_alarm_any += int(bool(flags))
        for name, (code, corrupt) in CORRUPTIONS.items():
            c2, p2 = corrupt(cur, pri)
            flags = check_pair(c2, p2)
            caught[name] += int(any(f.code == code and f.blocking for f in flags))
    return caught, valid_pairs, false_alarm_blocking, false_alarm_any


def run_timing(n_pairs: int, size: int, seed0: int):
    """Each case: a current and two priors (a 3-visit history) as DICOM files."""
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_pairs):
            h = make_chest_history(seed0 + i, HISTORY_TRAJECTORIES[i % len(HISTORY_TRAJECTORIES)], 3, size)
            h.visits[2].save_as(os.path.join(tmp, f"{i:03d}_cur.dcm"), enforce_file_format=True)
            h.visits[1].save_as(os.path.join(tmp, f"{i:03d}_pri.dcm"), enforce_file_format=True)
            h.visits[0].save_as(os.path.join(tmp, f"{i:03d}_old.dcm"), enforce_file_format=True)
        child = [sys.executable, __file__, "--_timing-child", tmp] + (["--registration", "bspline"] if DEFORMABLE else [])
        out = subprocess.run(child, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def timing_child(folder: str) -> None:
    load_s, cmp_s, one_s = [], [], []
    files = sorted(Path(folder).glob("*_cur.dcm"))
    t0 = time.perf_counter()  # first call: imports SimpleITK/scipy and warms caches; reported apart
    priors_of = lambda f: [load_image(str(f).replace("_cur", k)) for k in ("_pri", "_old")]  # noqa: E731
    compare_warm = compare(load_image(files[0]), priors_of(files[0]), deformable=DEFORMABLE)
    cold = time.perf_counter() - t0
    for f in files:
        t0 = time.perf_counter()
        cur = load_image(f)
        pri = priors_of(f)
        t1 = time.perf_counter()
        compare_warm = compare(cur, pri, deformable=DEFORMABLE)  # with overlay: the node's real call
        t2 = time.perf_counter()
        load_s.append(t1 - t0)
        cmp_s.append(t2 - t1)
        # reference in the same run: the same current against its most recent prior alone
        t3 = time.perf_counter()
        compare(cur, pri[:1], deformable=DEFORMABLE)
        one_s.append(time.perf_counter() - t3)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load": load_s, "compare": cmp_s, "one_prior": one_s, "peak_rss_mb": rss_mb, "cold": cold,
                      "shape": list(cur.pixels.shape), "last_regions": len(compare_warm.regions)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=216, help="chest pairs for accuracy (default 216)")
    ap.add_argument("--size", type=int, default=512, help="chest pair size in px for accuracy (default 512)")
    ap.add_argument("--ct-pairs", type=int, default=12)
    ap.add_argument("--sanity-pairs", type=int, default=24, help="valid pairs, each corrupted every way")
    ap.add_argument("--timing-pairs", type=int, default=8)
    ap.add_argument("--timing-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--histories", type=int, default=80, help="2-/3-visit histories (default 80)")
    ap.add_argument("--registration", choices=("affine", "bspline"), default="affine")
    ap.add_argument("--no-prior-queries", type=int, default=10,
                    help="no-prior arm: queries per arm (nodule / normal) against a library of normals "
                         "(reference_accuracy.py; 0: skip)")
    ap.add_argument("--no-prior-library", type=int, default=20, help="normals in the no-prior arm's library")
    ap.add_argument("--_timing-child", dest="timing_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEFORMABLE
    DEFORMABLE = args.registration == "bspline"
    if args.timing_child:
        timing_child(args.timing_child)
        return

    t_start = time.perf_counter()
    if args.pairs > 0:
        accuracy_section(args)
    if args.histories > 0:
        history_section(args)
    ct_sanity_timing(args)
    if args.no_prior_queries > 0:
        from reference_accuracy import no_prior_arm  # this folder: a sibling benchmark

        print()
        print("No-prior arm: the query against matched normal references of other people (issue 17)")
        no_prior_arm(args.no_prior_library, args.no_prior_queries, args.size, timing_runs=0)
    print()
    print(f"(benchmark wall time {time.perf_counter() - t_start:.0f} s)")


def accuracy_section(args) -> None:
    print(f"Accuracy: {args.pairs} chest radiograph pairs of {args.size}x{args.size} "
          f"({len(CHEST_CHANGES)} classes incl. stable; repositioning, exposure and noise differences)")
    per_class, big, small, stable_pairs, stable_false, secs = run_accuracy(args.pairs, args.size, args.seed)
    print()
    print("| class | truth | sensitivity | precision | status right | zone right | mean IoU | nodule diam. err |")
    print("|---|---|---|---|---|---|---|---|")
    tot = defaultdict(int)
    for change in CHEST_CHANGES:
        c = per_class[change]
        if change == "stable":
            continue
        prec = (c["found"] - c["false"]) / c["found"] if c["found"] else float("nan")
        for k in ("truth", "hit", "found", "false", "status_ok", "zone_ok"):
            tot[k] += c[k]
        diam = f"{np.median(c['diam_err']):.0%}" if c["diam_err"] else "-"
        print(f"| {change} | {c['truth']} | {c['hit'] / max(1, c['truth']):.2f} | {prec:.2f} | "
              f"{c['status_ok'] / max(1, c['hit']):.2f} | {c['zone_ok'] / max(1, c['hit']):.2f} | "
              f"{np.mean(c['iou']) if c['iou'] else 0:.2f} | {diam} |")
    all_iou = [v for ch in CHEST_CHANGES for v in per_class[ch]["iou"]]
    print(f"| **all changes** | {tot['truth']} | {tot['hit'] / max(1, tot['truth']):.2f} | "
          f"{(tot['found'] - tot['false']) / max(1, tot['found']):.2f} | {tot['status_ok'] / max(1, tot['hit']):.2f} | "
          f"{tot['zone_ok'] / max(1, tot['hit']):.2f} | {np.mean(all_iou):.2f} | |")
    print()
    print(f"- sensitivity, changes >= 10 mm: {big['hit'] / max(1, big['truth']):.3f} ({big['hit']}/{big['truth']})"
          f"  [target >= 0.95]")
    print(f"- sensitivity, changes < 10 mm: {small['hit'] / max(1, small['truth']):.3f} "
          f"({small['hit']}/{small['truth']})")
    print(f"- false regions per stable pair: {stable_false / max(1, stable_pairs):.3f} "
          f"({stable_false} in {stable_pairs} stable pairs)  [target <= 0.10]")
    print(f"- false regions per change pair (besides the true one): "
          f"{tot['false'] / max(1, args.pairs - stable_pairs):.3f}")
    print(f"- change status right (of detected): {tot['status_ok'] / max(1, tot['hit']):.3f}  [target >= 0.85]")
    print(f"- compare() seconds per {args.size} pair: median {np.median(secs):.2f}, p95 {np.percentile(secs, 95):.2f}")



def ct_sanity_timing(args) -> None:
    if args.ct_pairs:
        ct = run_ct(args.ct_pairs, args.seed + 50_000)
        print()
        print(f"CT volumes: {args.ct_pairs} pairs of 48x160x160 (3 x 2 x 2 mm), rigid 3D registration")
        print(f"- sensitivity {ct['hit']}/{ct['truth']}, status right {ct['status_ok']}/{max(1, ct['hit'])}, "
              f"side right {ct['zone_ok']}/{max(1, ct['hit'])}, false regions per stable pair "
              f"{ct['stable_false'] / max(1, ct['stable']):.2f}")

    if not args.sanity_pairs:
        return timing_section(args)
    print()
    caught, valid, fa_block, fa_any = run_sanity(args.sanity_pairs, 256, args.seed + 90_000)
    print(f"Sanity gate: {args.sanity_pairs} valid pairs (256 px), each corrupted {len(CORRUPTIONS)} ways")
    print("| corruption | caught |")
    print("|---|---|")
    for name, n in caught.items():
        print(f"| {name} | {n}/{args.sanity_pairs} |")
    print(f"- false alarms on valid pairs: {fa_block}/{valid} blocking, {fa_any}/{valid} any flag")
    timing_section(args)


def timing_section(args) -> None:
    if args.timing_pairs:
        print()
        t = run_timing(args.timing_pairs, args.timing_size, args.seed + 70_000)
        total = np.array(t["load"]) + np.array(t["compare"])
        print(f"Speed: {args.timing_pairs} currents of {args.timing_size}x{args.timing_size} with two priors each, from DICOM files, "
              f"{os.cpu_count()} CPU cores, fresh process")
        print(f"- decode the three files: median {np.median(t['load']):.2f} s")
        print(f"- compare() incl. overlay: median {np.median(t['compare']):.2f} s, max {np.max(t['compare']):.2f} s")
        print(f"- decode + compare per current: median {np.median(total):.2f} s, max {np.max(total):.2f} s  "
              f"[target < 3 s]")
        ratio = np.median(np.array(t["compare"]) / np.array(t["one_prior"]))
        print(f"- reference in the same run, the same current with its most recent prior only: median "
              f"{np.median(t['one_prior']):.2f} s; two priors cost {ratio:.2f}x that "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores during the run)")
        print(f"- first call in a fresh process (imports, warm-up; not in the figures above): {t['cold']:.2f} s")
        print(f"- peak RSS of that process: {t['peak_rss_mb']:.0f} MB  [limit 2048 MB]")


if __name__ == "__main__":
    main()
