"""The pipeline through crashes and outages: real Redis, real worker processes, real Orthanc.

Each test runs the whole local stack (the quickstart's), breaks one part of it on purpose and
checks that every study still gets exactly one report in the PACS.
"""

from __future__ import annotations

import time

import pytest

from dicom_node.identity import RESULT_SERIES_DESCRIPTION
from dicom_node.index import Index
from dicom_node.local_stack.scenario import acquire, seed_pacs, wait_for_report, write_history
from dicom_node.local_stack.stack import LocalStack, Ports
from tests.support.pipeline import jobs_of, new_patient_study, poison_study, send_to_node
from tests.support.waiting import wait_until


@pytest.fixture
def make_stack(tmp_path):
    stacks: list[LocalStack] = []

    def start(io_workers: int = 1, gpu_workers: int = 1, **env: str) -> LocalStack:
        stack = LocalStack(tmp_path / f"stack{len(stacks)}", Ports.free(), extra_env=env)
        stacks.append(stack)
        return stack.start(io_workers, gpu_workers)

    yield start
    for stack in stacks:
        stack.stop()


def reports_in_pacs(stack: LocalStack, study_uid: str) -> list[str]:
    uids = []
    for instance in stack.orthanc.instances_of_study(study_uid):
        if stack.orthanc.get(f"/instances/{instance['ID']}/simplified-tags").get("SeriesDescription") == RESULT_SERIES_DESCRIPTION:
            uids.append(instance["MainDicomTags"]["SOPInstanceUID"])
    return uids


def assert_exactly_one_report(stack: LocalStack, study_uid: str) -> None:
    wait_for_report(stack.orthanc, study_uid, timeout=120)
    time.sleep(2)  # a duplicate delivery would land right after the first
    assert len(reports_in_pacs(stack, study_uid)) == 1


def test_gpu_worker_killed_mid_comparison(make_stack, tmp_path):
    # The dead worker stops renewing its lease; the coordinator hands the stage to another worker
    # (Redis's visibility timeout stays at its two hours: nothing waits for it).
    stack = make_stack(gpu_workers=1)
    scenario = write_history(tmp_path / "data", "new_nodule", size=512)
    seed_pacs(stack.orthanc, scenario)
    acquire(stack.orthanc, scenario)
    wait_until(lambda: [j for j in jobs_of(stack, scenario.current_study_uid) if j.state == "compare" and j.lease_owner],
               timeout=90, interval=0.02, what="the comparison to start")
    stack.kill_group("worker-gpu1")  # the worker and its pool child, as in a node crash
    assert jobs_of(stack, scenario.current_study_uid)[-1].state == "compare"  # killed before it finished
    stack.start_worker("gpu", 2)
    assert_exactly_one_report(stack, scenario.current_study_uid)
    [job] = wait_until(lambda: [j for j in jobs_of(stack, scenario.current_study_uid) if j.state == "done"], timeout=30,
                       what="one job, done")
    assert job.attempts == 1  # the dead worker's attempt, counted (a poison study cannot loop forever)


def test_redis_down_while_studies_arrive(make_stack, tmp_path):
    stack = make_stack()
    stack.redis.stop()
    studies = [new_patient_study(tmp_path / "in", n) for n in (1, 2)]
    send_to_node(stack, *(path for _, path in studies))  # the SCP acknowledges with the broker down
    index = Index(f"sqlite:///{stack.workdir / 'node' / 'index.db'}")
    try:
        # The jobs exist in the index, with no wake-up sent: the broker is away.
        wait_until(lambda: all(jobs_of(stack, uid) for uid, _ in studies), timeout=60, what="both jobs created")
        assert all(j.state == "priors" and j.published_at is None for uid, _ in studies for j in jobs_of(stack, uid))
        assert index.counts()["instances"] == 2
    finally:
        index.dispose()
    stack.redis.start()
    for study_uid, _ in studies:
        assert_exactly_one_report(stack, study_uid)


def test_pacs_down_during_delivery(make_stack, tmp_path):
    stack = make_stack(DICOM_NODE_PRIORS__ARCHIVES="[]")  # no archive: the job goes straight to delivery
    stack.orthanc.stop()
    study_uid, path = new_patient_study(tmp_path / "in", 3)
    send_to_node(stack, path)
    job = wait_until(lambda: [j for j in jobs_of(stack, study_uid) if j.state == "deliver" and j.last_error],
                     timeout=90, what="a failed delivery attempt")[0]
    assert "orthanc" in job.last_error.lower()
    stack.orthanc.start()
    assert_exactly_one_report(stack, study_uid)
    assert wait_until(lambda: jobs_of(stack, study_uid)[-1].state == "done", timeout=30, what="job done")


def test_every_process_restarted_mid_flight(make_stack, tmp_path):
    stack = make_stack()
    studies = [new_patient_study(tmp_path / "in", n) for n in (4, 5, 6)]
    send_to_node(stack, *(path for _, path in studies))
    wait_until(lambda: any(jobs_of(stack, uid) for uid, _ in studies), timeout=60, what="the first job")
    for name in list(stack.processes):
        stack.kill_group(name)  # node, dispatcher and workers die at once
    stack.redis.stop()
    stack.redis.start()
    stack.start_node()
    stack.start_worker("io")
    stack.start_worker("gpu")
    for study_uid, _ in studies:
        assert_exactly_one_report(stack, study_uid)
        assert len(jobs_of(stack, study_uid)) == 1  # same input set: one job, never two


def test_poison_study_fails_with_reason_and_does_not_block(make_stack, tmp_path):
    stack = make_stack(DICOM_NODE_TASK_MAX_RETRIES="1")
    poison_uid, poison = poison_study(tmp_path / "in", 7)  # decodes, but cannot be measured
    good_uid, good = new_patient_study(tmp_path / "in", 8)
    send_to_node(stack, poison)
    send_to_node(stack, good)
    job = wait_until(lambda: [j for j in jobs_of(stack, poison_uid) if j.state == "failed"], timeout=90, what="the poison job to fail")[0]
    assert "PixelSpacing" in job.last_error
    assert_exactly_one_report(stack, good_uid)
    assert reports_in_pacs(stack, poison_uid) == []


def test_late_instance_after_the_report_gives_a_revision_naming_the_first(make_stack, tmp_path):
    stack = make_stack(DICOM_NODE_PRIORS__ARCHIVES="[]")
    study_uid, first = new_patient_study(tmp_path / "in", 9)
    send_to_node(stack, first)
    assert_exactly_one_report(stack, study_uid)
    [original] = reports_in_pacs(stack, study_uid)
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    late = dcmread(first)  # a second image of the same study, arriving after the report went out
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.InstanceNumber = 2
    late.save_as(tmp_path / "in" / "late.dcm", enforce_file_format=True)
    send_to_node(stack, tmp_path / "in" / "late.dcm")
    jobs = wait_until(lambda: (j := jobs_of(stack, study_uid)) and len(j) == 2 and all(x.state == "done" for x in j) and j,
                      timeout=120, what="the re-analysis done")
    assert jobs[1].result["revision"] == 2 and jobs[1].result["predecessor_sr"] == original
    uids = wait_until(lambda: (u := reports_in_pacs(stack, study_uid)) and len(u) == 2 and u, timeout=30, what="the revision in the PACS")
    [revision] = [u for u in uids if u != original]
    instance = [i for i in stack.orthanc.instances_of_study(study_uid) if i["MainDicomTags"]["SOPInstanceUID"] == revision][0]
    from io import BytesIO

    sr = dcmread(BytesIO(stack.orthanc.instance_file(instance["ID"])))
    named = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert named == original and sr.InstanceNumber == 2
