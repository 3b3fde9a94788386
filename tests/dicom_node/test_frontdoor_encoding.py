"""The front door's direct encodings are byte for byte what pynetdicom and pydicom write.

The C-STORE response and the spool file's meta header are built with struct instead of through
pydicom Datasets (frontdoor.py, for speed); these compare them with the library's own output
for the values a node sends, odd and even lengths, with and without a comment, and check that
what they do not handle still goes to pynetdicom.
"""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta

from dicom_node import frontdoor

CT = "1.2.840.10008.5.1.4.1.1.2"  # even length
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # odd length


def response(status: int, comment: str | None, sop_class: str, sop_instance: str) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


def pynetdicom_command(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 16384))
    (_, fragment), = pdata.presentation_data_value_list
    assert fragment[0] == 0x03
    return fragment[1:]


@pytest.mark.parametrize("status, comment", [
    (0x0000, None),
    (0xB007, "Conflicting duplicate kept"),  # odd length: space-padded
    (0xA900, "SOPClassUID differs from the request's AffectedSOPClassUID"),
    (0xC000, ""),
])
@pytest.mark.parametrize("sop_class, sop_instance", [(CT, "1.2.3.4"), (US_RETIRED, "1.2.3.45")])
def test_store_response_is_encoded_as_pynetdicom_does(status, comment, sop_class, sop_instance):
    rsp = response(status, comment, sop_class, sop_instance)
    assert frontdoor._store_response_command(rsp) == pynetdicom_command(rsp)


def test_what_the_direct_response_does_not_encode_is_left_to_pynetdicom():
    rsp = response(0xA900, None, CT, "1.2.3.4")
    rsp.OffendingElement = [0x00080018]
    assert frontdoor._store_response_command(rsp) is None
    assert frontdoor._store_response_command(response(0xC000, "Fehler: Größe", CT, "1.2.3.4")) is None


@pytest.mark.parametrize("sop_class, sop_instance, syntax", [
    (CT, "1.2.3.4", "1.2.840.10008.1.2.1"),
    (US_RETIRED, "1.2.3.45", "1.2.840.10008.1.2.4.50"),
])
def test_spool_meta_header_is_written_as_pydicom_does(sop_class, sop_instance, syntax):
    ours, theirs = BytesIO(), BytesIO()
    frontdoor._write_spool_meta(ours, frontdoor._spool_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax))
    write_file_meta_info(theirs, create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax))
    assert ours.getvalue() == theirs.getvalue()


def test_another_meta_dataset_is_written_by_pydicom():
    meta = create_file_meta(sop_class_uid=CT, sop_instance_uid="1.2.3.4", transfer_syntax="1.2.840.10008.1.2")
    ours, theirs = BytesIO(), BytesIO()
    frontdoor._write_spool_meta(ours, meta)
    write_file_meta_info(theirs, meta)
    assert ours.getvalue() == theirs.getvalue()
