"""The front door's direct encodings are byte for byte what pynetdicom and pydicom write.

The C-STORE response and the spool file's meta header are built with struct instead of through
pydicom Datasets (dimse_codec.py, for speed); these compare them with the library's own output
for the values a node sends, odd and even lengths, with and without a comment, and check that
what they do not handle still goes to pynetdicom. The C-STORE request's command is decoded
with struct too; its primitive is compared with the one pynetdicom makes. The UID setter's
shortcut gives what pynetdicom's set_uid gives, and leaves every other value to it.
"""

from __future__ import annotations

import re
import struct
from io import BytesIO

import pynetdicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_items import AbstractSyntaxSubItem
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

from dicom_node import dimse_codec, frontdoor

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
    assert dimse_codec.store_response_command(rsp) == pynetdicom_command(rsp)


def test_what_the_direct_response_does_not_encode_is_left_to_pynetdicom():
    rsp = response(0xA900, None, CT, "1.2.3.4")
    rsp.OffendingElement = [0x00080018]
    assert dimse_codec.store_response_command(rsp) is None
    assert dimse_codec.store_response_command(response(0xC000, "Fehler: Größe", CT, "1.2.3.4")) is None


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


# --- the C-STORE request's command, decoded directly -------------------------------------------

STORE_KEYWORDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                  "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")


def store_request_command(**values) -> bytes:
    """A C-STORE-RQ command set as pynetdicom's SCU encodes it."""
    rq = C_STORE()
    for keyword, value in {"MessageID": 7, "AffectedSOPClassUID": CT, "AffectedSOPInstanceUID": "1.2.3.4", **values}.items():
        setattr(rq, keyword, value)
    rq.DataSet = BytesIO(b"\0" * 4)
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    pdatas = list(message.encode_msg(1, 16384))
    (_, fragment), = pdatas[0].presentation_data_value_list
    assert fragment[0] == 0x03
    return fragment[1:]


def element(number: int, value: bytes) -> bytes:
    return dimse_codec.implicit_element(number, value)


def pynetdicom_request(command: bytes) -> C_STORE:
    """What pynetdicom makes of a command fragment (data sets in memory, the default)."""
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((1, b"\x03" + command))
    message = DIMSEMessage()
    assert message.decode_msg(pdata) is False  # a data set follows
    return message.message_to_primitive()


def same_request(ours: C_STORE, theirs: C_STORE) -> None:
    for keyword in STORE_KEYWORDS:
        assert getattr(ours, keyword) == getattr(theirs, keyword), keyword
        assert type(getattr(ours, keyword)) is type(getattr(theirs, keyword)), keyword


@pytest.mark.parametrize("values", [
    {},
    {"AffectedSOPClassUID": US_RETIRED, "AffectedSOPInstanceUID": "1.2.3.45", "Priority": 1, "MessageID": 65535},
    {"MoveOriginatorApplicationEntityTitle": "PACS", "MoveOriginatorMessageID": 3},  # a C-MOVE's sub-operation
    {"MoveOriginatorApplicationEntityTitle": "ODD", "MoveOriginatorMessageID": 0},
])
def test_store_request_is_decoded_as_pynetdicom_does(values):
    command = store_request_command(**values)
    ours = dimse_codec.store_request(command)
    assert ours is not None
    same_request(ours, pynetdicom_request(command))


def test_store_request_without_group_length_or_priority_and_space_padded_uids():
    command = b"".join((
        element(0x0002, CT.encode()),
        element(0x0100, b"\x01\x00"),
        element(0x0110, b"\x09\x00"),
        element(0x0800, b"\x02\x00"),
        element(0x1000, b"1.2.3.45 "),  # padded with a space, not a NUL
    ))
    ours = dimse_codec.store_request(command)
    assert ours is not None and ours.AffectedSOPInstanceUID == "1.2.3.45" and ours.Priority == 2
    same_request(ours, pynetdicom_request(command))


def with_element(command: bytes, number: int, value: bytes | None) -> bytes:
    """`command` with one element replaced, added or (value None) left out; group length kept out."""
    elements = dimse_codec.command_elements(command)
    assert elements is not None
    elements.pop(0x0000)
    if value is None:
        elements.pop(number)
    else:
        elements[number] = value
    return b"".join(element(n, v) for n, v in sorted(elements.items()))


def test_what_the_direct_request_decoder_does_not_handle_is_left_to_pynetdicom():
    command = store_request_command()
    assert dimse_codec.store_request(with_element(command, 0x0110, b"\x08\x00")).MessageID == 8  # the helper works
    echo = b"".join((element(0x0002, b"1.2.840.10008.1.1\0"), element(0x0100, b"\x30\x00"),
                     element(0x0110, b"\x01\x00"), element(0x0800, b"\x01\x01")))
    cases = {
        "a C-ECHO": echo,
        "no data set": with_element(command, 0x0800, b"\x01\x01"),
        "an element a request does not have": with_element(command, 0x0902, b"HI"),
        "no instance UID": with_element(command, 0x1000, None),
        "a group length of 2 bytes": element(0x0000, b"\x00\x00") + with_element(command, 0x0110, b"\x07\x00"),
        "truncated": command[:-3],
        "another group": command + struct.pack("<HHL", 8, 0x18, 2) + b"1.",
        "two instance UIDs (VM 2)": with_element(command, 0x1000, b"1.2.3.4\\1.5\0"),
        "a UID with a letter": with_element(command, 0x1000, b"1.2.3.a "),
        "an empty UID": with_element(command, 0x1000, b""),
        "a Message ID of 4 bytes": with_element(command, 0x0110, b"\x07\x00\x00\x00"),
        "a multi-valued move originator": with_element(command, 0x1030, b"A\\B "),
    }
    for what, case in cases.items():
        assert dimse_codec.store_request(case) is None, what


def test_a_non_conformant_uid_is_taken_as_pynetdicom_takes_it():
    """'1.02' passes the character check; pynetdicom only warns about it (the ingest refuses it)."""
    command = with_element(store_request_command(), 0x1000, b"1.02")
    ours = dimse_codec.store_request(command)
    assert ours is not None and ours.AffectedSOPInstanceUID == "1.02"
    same_request(ours, pynetdicom_request(command))


def test_a_p_data_tf_is_encoded_as_pynetdicom_does():
    pdata = P_DATA()
    fragment = b"\x03" + dimse_codec.store_response_command(response(0x0000, None, CT, "1.2.3.4"))
    pdata.presentation_data_value_list.append((5, fragment))
    assert dimse_codec.p_data_tf(5, fragment) == P_DATA_TF(pdata).encode()


def p_data_tf(*items: tuple[int, bytes]) -> bytes:
    pdata = P_DATA()
    pdata.presentation_data_value_list.extend(items)
    return P_DATA_TF(pdata).encode()


def test_data_fragments_lie_where_pynetdicom_decodes_them():
    pdu = p_data_tf((3, b"\x00" + b"a" * 101), (3, b"\x00"), (3, b"\x02" + b"b" * 7))
    fragments = dimse_codec.data_fragments(bytearray(pdu), 3)
    decoded = P_DATA_TF()
    decoded.decode(pdu)
    assert [pdu[start:end] for start, end in fragments.spans] == [data[1:] for _, data in decoded.to_primitive().presentation_data_value_list]
    assert fragments.last is True
    assert dimse_codec.data_fragments(p_data_tf((3, b"\x00" + b"a" * 10)), 3).last is False


@pytest.mark.parametrize("pdu", [
    p_data_tf((3, b"\x03" + b"c" * 10)),                   # a command fragment
    p_data_tf((3, b"\x00" + b"a" * 10), (3, b"\x01c")),    # a command fragment after data
    p_data_tf((5, b"\x02" + b"a" * 10)),                   # another presentation context
    p_data_tf((3, b"\x02a"), (3, b"\x00b")),              # more after the last fragment
    p_data_tf((3, b"\x00" + b"a" * 10))[:-1],              # shorter than it declares
    p_data_tf((3, b"\x00" + b"a" * 10)) + b"x",            # longer than it declares
    struct.pack(">BBL", 0x04, 0, 8) + struct.pack(">LBB", 1, 3, 0) + b"\x00\x00",   # item length 1
    struct.pack(">BBL", 0x04, 0, 10) + struct.pack(">LBB", 8, 3, 0) + b"\x00" * 4,  # item past the PDU
    struct.pack(">BBL", 0x04, 0, 0),                         # no item at all
    b"\x05" + p_data_tf((3, b"\x00a"))[1:],                # not a P-DATA-TF
])
def test_what_the_data_fast_path_does_not_handle_is_left_to_pynetdicom(pdu):
    assert dimse_codec.data_fragments(bytearray(pdu), 3) is None


def test_a_whole_command_lies_where_pynetdicom_decodes_it():
    command = store_request_command()
    pdu = p_data_tf((5, b"\x03" + command))
    decoded = P_DATA_TF()
    decoded.decode(pdu)
    [(context_id, data)] = decoded.to_primitive().presentation_data_value_list
    assert dimse_codec.whole_command(bytearray(pdu)) == (context_id, bytes(data[1:])) == (5, command)


@pytest.mark.parametrize("pdu", [
    p_data_tf((3, b"\x01" + b"c" * 10)),                   # a command fragment, not the last
    p_data_tf((3, b"\x02" + b"a" * 10)),                   # the last data fragment
    p_data_tf((3, b"\x03" + b"c" * 10), (3, b"\x02a")),    # a data fragment after the command
    p_data_tf((3, b"\x03" + b"c" * 10))[:-1],              # shorter than it declares
    p_data_tf((3, b"\x03" + b"c" * 10)) + b"x",            # longer than it declares
    struct.pack(">BBL", 0x04, 0, 8) + struct.pack(">LBB", 1, 3, 3) + b"\x00\x00",   # item length 1
    struct.pack(">BBL", 0x04, 0, 0),                          # no item at all
    b"\x05" + p_data_tf((3, b"\x03c"))[1:],                # not a P-DATA-TF
])
def test_what_the_command_fast_path_does_not_handle_is_left_to_pynetdicom(pdu):
    assert dimse_codec.whole_command(bytearray(pdu)) is None


# --- the UID setter of DIMSE primitives and PDU items (frontdoor._set_uid) -----------------------


@pytest.mark.parametrize("value", [CT, US_RETIRED, "0", "1.2.3.4", "2.25." + "9" * 59, UID(CT), b"1.2.840.10008.1.2.1"])
def test_a_conformant_uid_is_set_as_pynetdicoms_set_uid_sets_it(value, caplog, monkeypatch):
    theirs = frontdoor._PYNETDICOM_SET_UID(value, "Affected SOP Class UID")
    monkeypatch.setattr(frontdoor, "_PYNETDICOM_SET_UID", lambda *args: pytest.fail("not taken as conformant"))
    ours = frontdoor._set_uid(value, "Affected SOP Class UID")
    assert type(ours) is UID and ours == theirs
    assert not caplog.records


@pytest.mark.parametrize("value", ["1.02.3", "1.2.", ".1.2", "1..2", "1." + "2" * 63, b"1.02.3", b"1.2.3\0",
                                   "1.2.3".encode("utf-16-le"), b"1.2.\xb3", None, ""])
def test_any_other_value_goes_to_pynetdicoms_set_uid(value, monkeypatch):
    calls = []
    monkeypatch.setattr(frontdoor, "_PYNETDICOM_SET_UID", lambda *args: calls.append(args) or "theirs")
    assert frontdoor._set_uid(value, "Affected SOP Instance UID") == "theirs"
    assert calls == [(value, "Affected SOP Instance UID", True, True, True)]


def test_a_non_conformant_or_invalid_uid_still_warns_or_raises_after_install(caplog):
    frontdoor.install()
    for module in (pynetdicom.dimse_primitives, pynetdicom.pdu_items, pynetdicom.pdu_primitives, pynetdicom.presentation):
        assert module.set_uid is frontdoor._set_uid, module.__name__
    item = AbstractSyntaxSubItem()
    item.abstract_syntax_name = b"1.2.840.10008.5.1.4.1.1.2"  # as an A-ASSOCIATE-RQ's item is decoded
    assert item.abstract_syntax_name == CT
    item.abstract_syntax_name = b"1.02.3"
    assert "Non-conformant 'Abstract Syntax Name'" in caplog.text
    request = C_STORE()
    request.AffectedSOPInstanceUID = "1.02.3"  # valid characters, not conformant: a warning
    assert request.AffectedSOPInstanceUID == "1.02.3"
    assert "Non-conformant 'Affected SOP Instance UID'" in caplog.text
    with pytest.raises(ValueError, match="Invalid 'Affected SOP Class UID'.*must not exceed 64"):
        request.AffectedSOPClassUID = "1.2." + "3" * 61


def test_a_validator_configured_otherwise_is_still_asked(monkeypatch):
    frontdoor.install()
    C_STORE().AffectedSOPClassUID = CT  # remembered as conformant: the validator still comes first
    monkeypatch.setitem(pynetdicom._config.VALIDATORS, "UI", lambda value: (False, "refused here"))
    with pytest.raises(ValueError, match="refused here"):
        C_STORE().AffectedSOPClassUID = CT


def test_a_conformant_uid_is_remembered_by_the_value_it_came_as_and_the_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(frontdoor, "_CONFORMANT_SEEN", {})
    monkeypatch.setattr(frontdoor, "CONFORMANT_SEEN_LIMIT", 3)
    first = frontdoor._set_uid("1.2.3.4", "Abstract Syntax Name")
    from_bytes = frontdoor._set_uid(b"1.2.3.4", "Abstract Syntax Name")
    monkeypatch.setattr(frontdoor, "_CONFORMANT_UID", None)  # a match now would fail the test
    assert frontdoor._set_uid("1.2.3.4", "Abstract Syntax Name") is first
    assert frontdoor._set_uid(b"1.2.3.4", "Abstract Syntax Name") is from_bytes == first
    monkeypatch.setattr(frontdoor, "_CONFORMANT_UID", re.compile(r"[0-9.]+"))
    for n in range(10):
        frontdoor._set_uid(f"1.2.{n}", "Affected SOP Instance UID")
        assert len(frontdoor._CONFORMANT_SEEN) <= 3


def test_a_non_conformant_uid_is_not_remembered(monkeypatch):
    calls = []
    monkeypatch.setattr(frontdoor, "_PYNETDICOM_SET_UID", lambda *args: calls.append(args[0]) or "theirs")
    for _ in range(2):
        assert frontdoor._set_uid("1.02.3", "Affected SOP Instance UID") == "theirs"
    assert calls == ["1.02.3", "1.02.3"] and "1.02.3" not in frontdoor._CONFORMANT_SEEN


# --- PresentationContext.add_transfer_syntax (frontdoor._add_transfer_syntax) ------------------


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, str(ExplicitVRLittleEndian), b"1.2.840.10008.1.2.4.50",
                                    "1.2.840.10008.1.2.4.52"])  # the last one retired, still known
def test_a_known_transfer_syntax_is_added_as_pynetdicom_adds_it(syntax, caplog, monkeypatch):
    theirs = PresentationContext()
    frontdoor._PYNETDICOM_ADD_TRANSFER_SYNTAX(theirs, syntax)
    frontdoor._PYNETDICOM_ADD_TRANSFER_SYNTAX(theirs, syntax)
    monkeypatch.setattr(frontdoor, "_PYNETDICOM_ADD_TRANSFER_SYNTAX", lambda *args: pytest.fail("not taken as known"))
    ours = PresentationContext()
    frontdoor._add_transfer_syntax(ours, syntax)
    frontdoor._add_transfer_syntax(ours, syntax)  # once only, as theirs
    assert ours.transfer_syntax == theirs.transfer_syntax and all(type(ts) is UID for ts in ours.transfer_syntax)
    assert not caplog.records


@pytest.mark.parametrize("syntax", [None, "", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.02.3", b"1.2.840.10008.1.2\0",
                                    "1.2.840.10008.1.2".encode("utf-16-le"), 12])
def test_any_other_transfer_syntax_goes_to_pynetdicom(syntax, monkeypatch):
    calls = []
    monkeypatch.setattr(frontdoor, "_PYNETDICOM_ADD_TRANSFER_SYNTAX", lambda cx, value: calls.append(value))
    frontdoor._add_transfer_syntax(PresentationContext(), syntax)
    assert calls == [syntax]


def test_after_install_an_unknown_transfer_syntax_still_warns(caplog):
    frontdoor.install()
    assert PresentationContext.add_transfer_syntax is frontdoor._add_transfer_syntax
    context = PresentationContext()
    context.add_transfer_syntax(CT)  # a DICOM UID, but a SOP class: pynetdicom warns
    context.add_transfer_syntax(ImplicitVRLittleEndian)
    assert context.transfer_syntax == [CT, ImplicitVRLittleEndian]
    assert "not a transfer syntax" in caplog.text


# --- the per-connection copy of the supported contexts (frontdoor._copy_contexts) -------------


def test_the_contexts_copy_is_a_copy_each_with_a_list_of_its_own_and_anything_else_is_deep_copied():
    from pynetdicom import AE, StoragePresentationContexts

    supported = AE(); supported.supported_contexts = StoragePresentationContexts
    originals = supported.supported_contexts
    copies = frontdoor._copy_contexts(originals)
    assert [vars(cx) for cx in copies] == [vars(cx) for cx in originals]
    assert all(type(new) is PresentationContext and new is not old and new._transfer_syntax is not old._transfer_syntax
               for new, old in zip(copies, originals))
    copies[0].add_transfer_syntax("1.2.840.10008.1.2.5")
    copies[0].scp_role = True
    assert "1.2.840.10008.1.2.5" not in originals[0].transfer_syntax and originals[0].scp_role is None
    other = [{"a": [1]}]
    copied = frontdoor._copy_contexts(other)
    assert copied == other and copied[0]["a"] is not other[0]["a"]
