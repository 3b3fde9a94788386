"""kill -9 the node in the middle of a storescu transfer: every acknowledged instance survives intact."""

from __future__ import annotations

import os
import re
import signal
import subprocess

from pydicom import dcmread

from dicom_node.index import Index
from dicom_node.synthetic import write_ct_study
from tests.support.dicom import dataset_bytes, incoming_files, stored_files
from tests.support.procs import free_port, start_node, stop, wait_for_port

from .conftest import NODE_AE, require_tool

SUCCESS_LINE = re.compile(r"Received Store Response \(Success\)")


def test_kill_9_mid_transfer_loses_no_acknowledged_instance(tmp_path):
    require_tool("storescu")
    _, paths = write_ct_study(tmp_path / "input", 400, rows=128, cols=128)
    root, port = tmp_path / "node", free_port()
    node = start_node(root, port)
    try:
        wait_for_port(port, proc=node)
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", NODE_AE, "127.0.0.1", str(port), *map(str, paths)],
            env=dict(os.environ, TCP_NODELAY="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        acknowledged = 0
        assert sender.stdout is not None
        for line in sender.stdout:
            if SUCCESS_LINE.search(line):
                acknowledged += 1
                if acknowledged == 100:
                    node.send_signal(signal.SIGKILL)
                    node.wait()
        sender.wait(timeout=60)
        assert sender.returncode != 0, "storescu should have lost its association"
        assert 100 <= acknowledged < len(paths)

        # Restart: start-up clears half-written files, and everything acknowledged is there.
        node = start_node(root, port)
        wait_for_port(port, proc=node)
        store = root / "store"
        assert incoming_files(store) == []
        index = Index(f"sqlite:///{root / 'index.db'}")
        indexed = {row["sop_instance_uid"] for row in index.study_instances(dcmread(paths[0]).StudyInstanceUID)}
        index.dispose()
        on_disk = {p.stem: p for p in stored_files(store)}
        for path in paths[:acknowledged]:
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert uid in on_disk, f"acknowledged instance {path.name} missing after crash"
            assert dataset_bytes(on_disk[uid]) == dataset_bytes(path)
            assert uid in indexed
        # Nothing half-written at a final path: every stored file is complete.
        by_uid = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
        for uid, stored in on_disk.items():
            assert dataset_bytes(stored) == dataset_bytes(by_uid[uid])
    finally:
        stop(node)
