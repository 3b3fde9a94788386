"""Worklist notification: the node's result reaches the RIS as HL7 ORU^R01, flagged when worse."""

from __future__ import annotations

import datetime as dt

import hl7
import pytest

from dicom_node.index import Index
from dicom_node.local_stack.procs import free_port
from dicom_node.local_stack.scenario import acquire, seed_pacs, wait_for_report, write_history
from dicom_node.local_stack.stack import LocalStack, Ports
from dicom_node.worklist import WorklistRejected, WorklistResult, oru_message, send_result
from tests.support.pipeline import jobs_of
from tests.support.ris import Ris
from tests.support.waiting import wait_until


def result(changes: tuple[str, ...]) -> WorklistResult:
    return WorklistResult("PAT|1", "HOSP", "Doe^Jane", "19600101", "ACC1", "1.2.3", "20261120120000",
                          "New 16 mm opacity | left middle zone", changes, "1.2.3.4", "job123")


def test_oru_message_fields_and_flag():
    message = hl7.parse(oru_message(result(("new", "stable")), "DICOM_NODE", "RIS", dt.datetime(2026, 11, 20, 12)))
    assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(message.segment("PID")[3]).startswith("PAT\\F\\1")  # delimiters escaped, not split
    assert str(message.segment("OBR")[25]) == "F"
    obx = {str(seg[3][0][0]): seg for seg in message.segments("OBX")}
    assert "left middle zone" in str(obx["IMP"][5])
    assert (str(obx["PRIO"][5]), str(obx["PRIO"][8])) == ("urgent", "A")
    stable = hl7.parse(oru_message(result(("stable",)), "DICOM_NODE", "RIS"))
    prio = [seg for seg in stable.segments("OBX") if str(seg[3][0][0]) == "PRIO"][0]
    assert (str(prio[5]), str(prio[8])) == ("routine", "N")


def test_rejection_is_permanent():
    ris = Ris(free_port(), answer="AR").start()
    try:
        with pytest.raises(WorklistRejected, match="rejected"):
            send_result(oru_message(result(("new",)), "N", "RIS"), "127.0.0.1", ris.port, 5)
    finally:
        ris.stop()


def test_result_reaches_the_ris_after_it_comes_back(tmp_path):
    ris_port = free_port()
    stack = LocalStack(tmp_path / "stack", Ports.free(),
                       extra_env={"DICOM_NODE_WORKLIST_HL7_HOST": "127.0.0.1", "DICOM_NODE_WORKLIST_HL7_PORT": str(ris_port)})
    ris = None
    try:
        stack.start()
        scenario = write_history(tmp_path / "data", "new_nodule", size=512)
        seed_pacs(stack.orthanc, scenario)
        acquire(stack.orthanc, scenario)
        wait_for_report(stack.orthanc, scenario.current_study_uid, timeout=150)
        # The RIS is down: the job waits in its notify stage with the reason, nothing is lost.
        job = wait_until(lambda: [j for j in jobs_of(stack, scenario.current_study_uid) if j.state == "notify" and j.last_error],
                         timeout=60, what="a failed notification")[0]
        assert "unreachable" in job.last_error
        ris = Ris(ris_port).start()
        wait_until(lambda: ris.messages, timeout=60, what="the result at the RIS")
        wait_until(lambda: jobs_of(stack, scenario.current_study_uid)[-1].state == "done", timeout=30, what="job done")
        sent = [r for r in Index(stack.node_env()["DICOM_NODE_DATABASE_URL"]).phi_accesses(scenario.current_study_uid)
                if r["action"] == "worklist_sent"]
        assert [r["peer"] for r in sent] == [f"127.0.0.1:{ris_port}"]  # audited once: when the RIS accepted it
    finally:
        stack.stop()
        if ris:
            ris.stop()
    [message] = ris.messages
    assert str(message.segment("PID")[3]).startswith("QS-0001")
    assert str(message.segment("OBR")[2]) == "QS2026"
    prio = [seg for seg in message.segments("OBX") if str(seg[3][0][0]) == "PRIO"][0]
    assert (str(prio[5]), str(prio[8])) == ("urgent", "A")  # a new nodule flags the worklist
