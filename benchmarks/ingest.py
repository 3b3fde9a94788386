"""Ingest speed and memory: the node's SCP against DCMTK storescp, in one run.

    python benchmarks/ingest.py [--instances 1000] [--size 128] [--memory-instances 10000]
    python benchmarks/ingest.py --big-instance-mb 1024 [--concurrent 16]   (RSS while receiving big instances)

DCMTK storescu (TCP_NODELAY=1) sends the same small CT instances over one association and
over four parallel associations into (a) the node (fsync + index commit before each
success) and (b) DCMTK storescp (no fsync), both writing under the same directory.
Prints images/s for each, the ratio node/storescp, and the node's resident memory
before and after (and, with --memory-instances, its RSS curve over that many instances).

It also times the node's ingest alone (parse, fsynced store, index commit; no network) on
the same disk: storescu waits for each answer, so on one association the node can never
beat that rate, whatever the network layer costs. The "ceiling" ratio printed beside it is
that rate against storescp's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.index import Index  # noqa: E402
from dicom_node.ingest import Ingestor  # noqa: E402
from dicom_node.storage import InstanceStore  # noqa: E402
from dicom_node.synthetic import write_ct_study  # noqa: E402
from tests.support.procs import free_port, start_node, start_storescp, wait_for_port  # noqa: E402


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS) or its peak (VmHWM) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def storescu(port: int, called_ae: str, folders: list[Path]) -> float:
    """Send each folder over its own association, all in parallel; returns elapsed seconds."""
    env = dict(os.environ, TCP_NODELAY="1")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", called_ae, "+sd", "127.0.0.1", str(port), str(folder)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def ingest_alone(root: Path, paths: list[Path]) -> float:
    """Images/s of the node's ingest without any networking: the one-association ceiling."""
    shutil.rmtree(root, ignore_errors=True)  # a reused --workdir: every instance must be new
    ingestor = Ingestor(InstanceStore(root / "store"), Index(f"sqlite:///{root / 'index.db'}"))
    seconds = []
    for path in paths:
        encoded = path.read_bytes()
        start = time.perf_counter()
        if not ingestor.ingest(encoded).ok:
            raise RuntimeError(f"ingest of {path} failed")
        seconds.append(time.perf_counter() - start)
    ingestor.index.dispose()
    return 1 / statistics.median(seconds)


def split(paths: list[Path], root: Path, parts: int) -> list[Path]:
    folders = []
    for part in range(parts):
        folder = root / f"part{part}"
        folder.mkdir(parents=True)
        for path in paths[part::parts]:
            os.link(path, folder / path.name)
        folders.append(folder)
    return folders


def write_big_instance(path: Path, megabytes: int) -> None:
    """A 1024x1024 16-bit multi-frame CT of about `megabytes`, written frame by frame."""
    from pydicom.uid import generate_uid

    from dicom_node.synthetic import ct_slice

    ds = ct_slice(generate_uid(), generate_uid(), 1, rows=1024, cols=1024)
    frame = 1024 * 1024 * 2
    ds.NumberOfFrames = max(1, (megabytes << 20) // frame)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    chunk = os.urandom(frame)
    with open(path, "ab") as f:
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (ds.NumberOfFrames * frame).to_bytes(4, "little"))
        for _ in range(ds.NumberOfFrames):
            f.write(chunk)


def big_instances(megabytes: int, concurrent: int, workdir: Path | None) -> None:
    """The node's RSS (sampled every 20 ms) while `concurrent` storescu send one big instance each."""
    import threading

    Path("var").mkdir(exist_ok=True)
    work = workdir or Path(tempfile.mkdtemp(prefix="bench-big-", dir="var"))
    folders = []
    for number in range(concurrent):
        folder = work / f"big{number}"
        folder.mkdir(parents=True)
        write_big_instance(folder / "big.dcm", megabytes)
        folders.append(folder)
    size_mb = (folders[0] / "big.dcm").stat().st_size / 2**20
    port = free_port()
    # All senders are on this host: no per-host limit; enough associations for all of them.
    node = start_node(work / "node", port, extra_env={
        "DICOM_NODE_STUDY_IDLE_SECONDS": "3600", "DICOM_NODE_MAX_CONNECTIONS_PER_HOST": "0",
        "DICOM_NODE_MAX_ASSOCIATIONS": str(max(16, concurrent)),
    })
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(memory_mb(node.pid))
            time.sleep(0.02)

    try:
        wait_for_port(port)
        time.sleep(1)
        before = memory_mb(node.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        elapsed = storescu(port, "DICOM_NODE", folders)
        done.set()
        sampler.join()
        stored = [p for p in (work / "node" / "store").rglob("*.dcm") if ".incoming" not in p.parts]
        peak = max(samples)
        print(f"\n{concurrent} x {size_mb:.0f} MiB multi-frame instance(s), one association each, {elapsed:.1f} s, "
              f"{len(stored)} stored")
        print(f"node RSS: {before:.0f} MiB before, peak {peak:.0f} MiB while receiving (growth {peak - before:.0f} MiB), "
              f"VmHWM {memory_mb(node.pid, 'VmHWM'):.0f} MiB")
    finally:
        done.set()
        node.terminate()
        node.wait()
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128, help="rows = columns of each CT slice")
    parser.add_argument("--memory-instances", type=int, default=0, help="also send this many and sample the node's RSS")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder under ./var")
    parser.add_argument("--big-instance-mb", type=int, default=0,
                        help="only measure the node's RSS while it receives big multi-frame instances of this size")
    parser.add_argument("--concurrent", type=int, default=1, help="with --big-instance-mb: this many at once, one association each")
    args = parser.parse_args()
    if args.big_instance_mb:
        big_instances(args.big_instance_mb, args.concurrent, args.workdir)
        return

    Path("var").mkdir(exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-", dir="var"))
    _, paths = write_ct_study(work / "input", args.instances, rows=args.size, cols=args.size)
    single = [work / "input"]
    four = split(paths, work / "split", 4)
    size_kb = paths[0].stat().st_size / 1024

    results: dict[str, dict[str, float]] = {"node": {}, "storescp": {}}
    node_port, ref_port = free_port(), free_port()
    node = start_node(work / "node", node_port, extra_env={"DICOM_NODE_STUDY_IDLE_SECONDS": "3600"})
    ref = start_storescp(work / "storescp", ref_port)
    try:
        wait_for_port(node_port)
        wait_for_port(ref_port)
        rss_before = memory_mb(node.pid)
        for label, folders in (("1 association", single), ("4 associations", four)):
            for name, port, ae in (("node", node_port, "DICOM_NODE"), ("storescp", ref_port, "STORESCP")):
                elapsed = storescu(port, ae, folders)
                results[name][label] = args.instances / elapsed
            # The second pass sends the same instances again: clear both stores so every
            # pass writes new files (the node would otherwise acknowledge duplicates).
            node.terminate()
            node.wait()
            shutil.rmtree(work / "node")
            shutil.rmtree(work / "storescp")
            (work / "storescp").mkdir()
            node = start_node(work / "node", node_port, extra_env={"DICOM_NODE_STUDY_IDLE_SECONDS": "3600"})
            wait_for_port(node_port)

        print(f"\n{args.instances} CT instances of {args.size}x{args.size} ({size_kb:.0f} KiB each), storescu with TCP_NODELAY=1")
        print(f"{'':16} {'node img/s':>11} {'storescp img/s':>15} {'ratio':>7} {'target':>7}")
        for label, target in (("1 association", 0.75), ("4 associations", 1.0)):
            n, r = results["node"][label], results["storescp"][label]
            print(f"{label:16} {n:11.0f} {r:15.0f} {n / r:7.2f} {target:7.2f}")
        sample = paths[:300]
        alone = ingest_alone(work / "alone", sample)
        ceiling = alone / results["storescp"]["1 association"]
        print(f"node ingest alone (no network, median of {len(sample)}): {alone:.0f} img/s; "
              f"one-association ceiling ratio {ceiling:.2f}")
        print(f"node RSS: {rss_before:.0f} MiB at start")

        if args.memory_instances:
            _, mem_paths = write_ct_study(work / "memory", args.memory_instances, rows=args.size, cols=args.size)
            batches = 10
            print(f"\nnode RSS while receiving {args.memory_instances} instances (one association per batch):")
            for batch in range(batches):
                folder = work / f"mem{batch}"
                folder.mkdir()
                for path in mem_paths[batch::batches]:
                    os.link(path, folder / path.name)
                storescu(node_port, "DICOM_NODE", [folder])
                print(f"  after {(batch + 1) * len(mem_paths) // batches:6d}: RSS {memory_mb(node.pid):6.1f} MiB")
            print(f"  peak RSS (VmHWM) {memory_mb(node.pid, 'VmHWM'):.1f} MiB")
    finally:
        node.terminate()
        ref.terminate()
        node.wait()
        ref.wait()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
