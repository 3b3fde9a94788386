"""Ingest speed and memory: the node's SCP against Orthanc and DCMTK storescp, in one run.

    python benchmarks/ingest.py [--repeats 3] [--instances N] [--scp-processes 2] [--ceiling] [--memory-instances 10000]
    python benchmarks/ingest.py --big-instance-mb 1024 [--concurrent 16]   (RSS while receiving big instances)

DCMTK storescu (TCP_NODELAY=1) sends the same CT instances (400 x 128x128, 33 KB; 200 x
512x512, 513 KB) over one association and over four parallel ones into (a) the node (file and
directory entry fsynced, index row committed, before each success), (b) Orthanc in its default
configuration (SyncStorageArea: each file fsynced) and (c) DCMTK storescp (no fsync), each
started on a new, empty folder on the same disk for every measurement, after the writes of
the one before are on disk (sync). Nothing is deleted until the table is done, and the
kernel's caches are dropped once before it (forget_deleted_inodes): on ext4 without a journal
(this project's VMs) creating a file skips, one by one, each cached inode deleted in the last
1-6 minutes, which charged whoever ran after a removal (1.1 ms more kernel CPU per instance
for the node, whose files share a folder; less for Orthanc, which spreads them). The table
takes about 2 GB of disk while it runs with --repeats 3 (a --workdir used again has its old
folders removed as each measurement starts: give a new one). Prints images/s, the ratio
node/Orthanc of the medians and the median of each repeat's own ratio (node and Orthanc run
back to back, so that ratio shares the host's conditions of the moment, which drift over the
table: both slow down together on the last cells here), the node's resident memory after each
run and its CPU per instance and cores used during it (all its processes; one process tops
out near one core: the GIL), Orthanc's CPU per instance beside it, and the host's steal. Runs
itself inside a private network namespace (Orthanc binds 0.0.0.0).

--ceiling also times the node's ingest alone (parse, fsynced store, index commit; no
network): storescu waits for each answer, so one association can never beat that rate.
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
from tests.support.procs import child_pids, free_port, start_node, start_storescp, wait_for_port  # noqa: E402


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


RECEIVERS = ("node", "orthanc", "storescp")
# (rows = columns, instances): the cells, a 33 KB and a 513 KB CT slice
CELLS = ((128, 400), (512, 200))


def forget_deleted_inodes() -> None:
    """Drop the kernel's caches (after a sync), and with them the inode-table blocks of files
    deleted lately, which ext4 without a journal would otherwise skip one by one on every new
    file for up to 6 minutes (see the module's docstring). Needs root."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        print(f"warning: the kernel's caches not dropped ({exc}): files deleted in the last minutes "
              "may slow whoever creates files first", file=sys.stderr)


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (several SCP processes), from /proc."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += child_pids(current)
    return pids


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (0 once it is gone), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_rss_mb(pid: int) -> float:
    return sum(memory_mb(current) for current in process_tree(pid))


def process_tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(current) for current in process_tree(pid))


def host_steal_seconds() -> float:
    """CPU time the hypervisor gave to others, all CPUs together (/proc/stat): a VM's runs are
    comparable only where it is low."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


class Receiver:
    """One receiver started on an empty folder for each measurement."""

    def __init__(self, name: str, root: Path, node_env: dict[str, str]) -> None:
        self.name, self.root, self.node_env = name, root, node_env
        self.port = free_port()
        self.proc = None
        self.orthanc = None

    @property
    def ae(self) -> str:
        return {"node": "DICOM_NODE", "orthanc": "ORTHANC", "storescp": "STORESCP"}[self.name]

    def start(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.name == "node":
            self.proc = start_node(self.root, self.port, extra_env=self.node_env)
            wait_for_port(self.port, proc=self.proc)
            self._wait_for_listeners(int(self.node_env.get("DICOM_NODE_SCP_PROCESSES", "1")))
        elif self.name == "storescp":
            self.proc = start_storescp(self.root, self.port)
            wait_for_port(self.port, proc=self.proc)
        else:
            from dicom_node.local_stack.orthanc import Orthanc

            # Orthanc's default configuration (SyncStorageArea: each file fsynced), its own ports.
            self.orthanc = Orthanc(self.root, dicom_port=self.port).start()
        time.sleep(0.5)

    def _wait_for_listeners(self, processes: int, timeout: float = 60) -> None:
        """Until every SCP process takes connections: the port opens with the first, which serves
        every connection made before the others are ready (which measured scp_processes 2 as 1)."""
        log, deadline = self.root / "serve.log", time.monotonic() + timeout
        while log.read_text(errors="replace").count('"event": "scp.process_ready"') < processes - 1:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"not all {processes} SCP processes ready; see {log}")
            time.sleep(0.1)

    def rss_mb(self) -> float:
        return process_tree_rss_mb(self.proc.pid) if self.name == "node" and self.proc else 0.0

    def cpu_seconds(self) -> float:
        """CPU the node (all its processes) or Orthanc has used so far; 0 for storescp."""
        if self.name == "node" and self.proc:
            return process_tree_cpu_seconds(self.proc.pid)
        if self.orthanc is not None and self.orthanc.proc is not None:
            return process_tree_cpu_seconds(self.orthanc.proc.pid)
        return 0.0

    def stop(self) -> None:
        if self.orthanc is not None:
            self.orthanc.stop()
            self.orthanc = None
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None


def speed_table(args, work: Path) -> None:
    node_env = {"DICOM_NODE_STUDY_IDLE_SECONDS": "3600", "DICOM_NODE_SCP_PROCESSES": str(args.scp_processes)}
    rows = []
    forget_deleted_inodes()
    for size, count in CELLS:
        count = args.instances or count
        _, paths = write_ct_study(work / f"input{size}", count, rows=size, cols=size)
        size_kb = paths[0].stat().st_size / 1024
        for parts in (1, 4):
            folders = [work / f"input{size}"] if parts == 1 else split(paths, work / f"split{size}", 4)
            rates: dict[str, list[float]] = {name: [] for name in RECEIVERS}
            rss, cpu_ms, cores, orthanc_cpu_ms, steal = [], [], [], [], []
            for repeat in range(args.repeats):
                for name in RECEIVERS:
                    # A folder of its own, removed after the table; the previous one's writes
                    # on disk first (see the module's docstring).
                    receiver = Receiver(name, work / f"{name}-{size}-{parts}-{repeat}", node_env)
                    os.sync()
                    receiver.start()
                    try:
                        cpu_before, steal_before = receiver.cpu_seconds(), host_steal_seconds()
                        seconds = storescu(receiver.port, receiver.ae, folders)
                        rates[name].append(count / seconds)
                        cpu = receiver.cpu_seconds() - cpu_before
                        steal.append((host_steal_seconds() - steal_before) / (seconds * (os.cpu_count() or 1)))
                        if name == "node":
                            rss.append(receiver.rss_mb())
                            cpu_ms.append(1000 * cpu / count)
                            cores.append(cpu / seconds)
                        elif name == "orthanc":
                            orthanc_cpu_ms.append(1000 * cpu / count)
                    finally:
                        receiver.stop()
            median = {name: statistics.median(values) for name, values in rates.items()}
            # Each repeat's node and Orthanc ran one after the other: their ratio shares the host's
            # conditions of the moment (steal, the disk's state), which drift over a table.
            paired = statistics.median(n / o for n, o in zip(rates["node"], rates["orthanc"]))
            rows.append((f"{count} x {size_kb:.0f} KB CT", parts, median, paired, max(rss),
                         statistics.median(cpu_ms), statistics.median(cores), statistics.median(orthanc_cpu_ms),
                         max(steal)))
            print(f"  {rows[-1][0]}, {parts} assoc: " + ", ".join(f"{n} {median[n]:.0f}" for n in RECEIVERS),
                  flush=True)
    # CPU per instance and cores used tell what bounds the node: about 1 core per process is the
    # GIL; Orthanc's CPU per instance, beside it, is what the same work costs in C++.
    print(f"\nimages/s, storescu with TCP_NODELAY=1, median of {args.repeats}; node with scp_processes={args.scp_processes}, "
          "RSS after each run and CPU (user + system) during it, all its processes; Orthanc's CPU likewise; "
          "the most CPU the host took away (steal) during any run of the row; same repeat: the median of each "
          "repeat's node / Orthanc, the two run one after the other")
    print("| instances | associations | node | Orthanc | storescp (no fsync) | node / Orthanc | same repeat | node RSS MiB "
          "| node CPU ms/instance | node cores used | Orthanc CPU ms/instance | host steal, max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, parts, median, paired, rss, cpu_ms, cores, orthanc_ms, most_steal in rows:
        n, o, r = median["node"], median["orthanc"], median["storescp"]
        print(f"| {label} | {parts} | {n:.0f} | {o:.0f} | {r:.0f} | {n / o:.2f} | {paired:.2f} | {rss:.0f} | {cpu_ms:.1f} | {cores:.2f} "
              f"| {orthanc_ms:.1f} | {100 * most_steal:.0f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=0, help="per cell; default: 400 small, 200 large")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell and receiver (the median is printed)")
    parser.add_argument("--scp-processes", type=int, default=1, help="the node's scp_processes")
    parser.add_argument("--memory-instances", type=int, default=0, help="also send this many and sample the node's RSS")
    parser.add_argument("--ceiling", action="store_true", help="also time the node's ingest alone (no network)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder under ./var")
    parser.add_argument("--big-instance-mb", type=int, default=0,
                        help="only measure the node's RSS while it receives big multi-frame instances of this size")
    parser.add_argument("--concurrent", type=int, default=1, help="with --big-instance-mb: this many at once, one association each")
    args = parser.parse_args()
    if args.big_instance_mb:
        big_instances(args.big_instance_mb, args.concurrent, args.workdir)
        return
    from dicom_node.local_stack.orthanc import run_in_private_network

    run_in_private_network()  # Orthanc binds 0.0.0.0

    Path("var").mkdir(exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-", dir="var"))
    try:
        speed_table(args, work)
        if args.ceiling:
            paths = sorted((work / "input128").glob("*.dcm"))[:300]
            alone = ingest_alone(work / "alone", paths)
            print(f"node ingest alone (no network, 128x128, median of {len(paths)}): {alone:.0f} img/s")
        if args.memory_instances:
            memory_curve(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def memory_curve(args, work: Path) -> None:
    port = free_port()
    node = start_node(work / "memnode", port, extra_env={"DICOM_NODE_STUDY_IDLE_SECONDS": "3600"})
    try:
        wait_for_port(port, proc=node)
        _, mem_paths = write_ct_study(work / "memory", args.memory_instances, rows=128, cols=128)
        batches = 10
        print(f"\nnode RSS while receiving {args.memory_instances} instances (one association per batch):")
        for batch in range(batches):
            folder = work / f"mem{batch}"
            folder.mkdir()
            for path in mem_paths[batch::batches]:
                os.link(path, folder / path.name)
            storescu(port, "DICOM_NODE", [folder])
            print(f"  after {(batch + 1) * len(mem_paths) // batches:6d}: RSS {process_tree_rss_mb(node.pid):6.1f} MiB")
    finally:
        node.terminate()
        node.wait()


if __name__ == "__main__":
    main()
