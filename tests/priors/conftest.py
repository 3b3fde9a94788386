"""Fixtures: one real Orthanc per module, seeded over C-STORE with a patient history; nodes that
register themselves in it as move destination; a "worker" index and ingestor of their own (the
Celery worker is a separate process from the SCP)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest

from dicom_node.config import Settings
from dicom_node.index import Index
from dicom_node.ingest import Ingestor
from dicom_node.priors.settings import ArchiveConfig, PriorSettings
from dicom_node.scp import DicomNode
from dicom_node.scu import Peer, send
from dicom_node.storage import InstanceStore
from tests.support.orthanc import Orthanc

from .history import Patient, Study, write

JANE = Patient("PAT001", "DOE^JANE", "19600101", issuer="HOSP_A")
JANE_OTHER_ISSUER = Patient("PAT001", "SMITH^ANNA", "19600101", issuer="HOSP_B")  # same ID, another hospital
JANE_NAMESAKE = Patient("PAT999", "DOE^JANE", "19751224", issuer="HOSP_A")  # same name, another patient


@dataclass
class History:
    """Studies seeded in the archive, by role. `current` is also in the archive (the PACS has it)."""

    current: Study
    recent: Study  # the expected prior: DX chest PA+LAT with a radiologist's SR and the node's own old result
    older_cr: Study  # CR chest PA: same modality group, older (the baseline when asked)
    ap_only: Study  # DX chest AP only: view differs
    ct: Study  # CT chest: modality differs
    hand: Study  # DX hand, left: body part differs
    too_old: Study  # outside the 5-year window
    same_day_later: Study  # same day as the current study, later
    node_only: Study  # holds only an overlay written by the node
    bad_date: Study  # StudyDate "2023": malformed
    other_issuer: Study
    namesake: Study

    def all(self) -> list[Study]:
        return list(self.__dict__.values())


def make_history() -> History:
    return History(
        current=Study(JANE, "20240601", "DX", "CHEST", "XR CHEST PA AND LATERAL", "ACC100", views=("PA", "LATERAL")),
        recent=Study(JANE, "20231115", "DX", "CHEST", "XR CHEST PA AND LATERAL", "ACC090", views=("PA", "LATERAL"),
                     images_per_series=2, report_text="Small left pleural effusion. No pneumothorax.", node_result=True),
        older_cr=Study(JANE, "20221010", "CR", "THORAX", "XR CHEST PA", "ACC080", views=("PA",)),
        ap_only=Study(JANE, "20230301", "DX", "CHEST", "XR CHEST PORTABLE", "ACC085", views=("AP",)),
        ct=Study(JANE, "20240101", "CT", "CHEST", "CT CHEST", "ACC095", views=("",)),
        hand=Study(JANE, "20240201", "DX", "HAND", "XR HAND LEFT", "ACC096", views=("PA",), laterality="L"),
        too_old=Study(JANE, "20170105", "DX", "CHEST", "XR CHEST PA", "ACC010", views=("PA",)),
        same_day_later=Study(JANE, "20240601", "DX", "CHEST", "XR CHEST PA", "ACC101", views=("PA",), time="153000"),
        node_only=Study(JANE, "20240301", "DX", "CHEST", "AI overlay", "ACC097", views=(), node_result=True),
        bad_date=Study(JANE, "2023", "DX", "CHEST", "XR CHEST PA", "ACC050", views=("PA",)),
        other_issuer=Study(JANE_OTHER_ISSUER, "20240415", "DX", "CHEST", "XR CHEST PA", "B0001", views=("PA",)),
        namesake=Study(JANE_NAMESAKE, "20240420", "DX", "CHEST", "XR CHEST PA", "C0001", views=("PA",)),
    )


@dataclass
class Archive:
    orthanc: Orthanc
    history: History
    files: dict[str, list[Path]]  # study UID -> its files

    def register(self, node: DicomNode, name: str = "node", ae_title: str = "", port: int = 0) -> None:
        """Make the node known to the archive (queries and C-MOVE destination) under `name`."""
        s = node.settings
        body = json.dumps([ae_title or s.ae_title, "127.0.0.1", port or s.port]).encode()
        request = urllib.request.Request(f"{self.orthanc.url}/modalities/{name}", data=body, method="PUT")
        urllib.request.urlopen(request, timeout=10).read()

    def unregister(self, name: str = "node") -> None:
        request = urllib.request.Request(f"{self.orthanc.url}/modalities/{name}", method="DELETE")
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except urllib.error.HTTPError:
            pass

    def config(self, method: str = "c-move", **overrides) -> ArchiveConfig:
        values = {"name": "pacs", "method": method, "ae_title": self.orthanc.aet, "host": "127.0.0.1", "port": self.orthanc.dicom_port,
                      "timeout_seconds": 10, "retrieve_timeout_seconds": 30}
        if method == "dicomweb":
            values["dicomweb_url"] = f"{self.orthanc.url}/dicom-web"
        values.update(overrides)
        return ArchiveConfig(**values)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    root = tmp_path_factory.mktemp("archive")
    history = make_history()
    orthanc = Orthanc(root / "orthanc").start()
    try:
        files = {}
        for study in history.all():
            datasets = study.datasets()
            if study is history.node_only:
                for ds in datasets:  # its only series: an image the node wrote (overlay)
                    if ds.Modality == "SR":
                        ds.Modality = "DX"
            files[study.uid] = write(datasets, root / "seed" / study.uid)
        everything = [p for paths in files.values() for p in paths]
        report = send(Peer("127.0.0.1", orthanc.dicom_port, orthanc.aet), everything, "SEEDER")
        assert report.sent == len(everything) and not report.failed, report
        yield Archive(orthanc, history, files)
    finally:
        orthanc.stop()


def prior_settings(node: DicomNode, *archives: ArchiveConfig, **overrides) -> Settings:
    values = {"archives": list(archives)}
    values.update(overrides)
    return node.settings.model_copy(update={"priors": PriorSettings(**values)})


@dataclass
class Worker:
    """What a Celery worker process holds: its own index connection and ingestor on the node's store."""

    index: Index
    ingestor: Ingestor


@pytest.fixture
def worker_for():
    made: list[Worker] = []

    def make(node: DicomNode) -> Worker:
        s = node.settings
        index = Index(s.database_url)
        worker = Worker(index, Ingestor(InstanceStore(s.storage_dir, 0, s.duplicate_policy), index))
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.index.dispose()


def ingest_current(node: DicomNode, archive: Archive) -> str:
    """The current study arrives at the node (as the PACS would route it)."""
    study = archive.history.current
    for path in archive.files[study.uid]:
        result = node.ingestor.ingest(path.read_bytes())
        assert result.ok, result
    return study.uid


def ingest_study(node: DicomNode, study: Study) -> str:
    """A study that is not in the archive arrives at the node."""
    for ds in study.datasets():
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        result = node.ingestor.ingest(buffer.getvalue())
        assert result.ok, result
    return study.uid
