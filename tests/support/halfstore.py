"""A peer that sends half a C-STORE: the command and the first data fragment, then nothing."""

from __future__ import annotations

import io
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from dicom_node.scu import Peer, _make_ae, associate
from dicom_node.synthetic import ct_slice


def half_a_c_store(peer: Peer, folder: Path):
    """An association with `peer` on which a C-STORE's data set has begun and stopped: the SCP
    holds a spool file for it. Returns the association (its socket: ``assoc.dul.socket.socket``)."""
    ds = ct_slice(generate_uid(), generate_uid(), 1)
    path = folder / "half.dcm"
    ds.save_as(path, enforce_file_format=True)
    ae = _make_ae("HALFSTORE")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = associate(ae, peer)
    req = C_STORE()
    req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = 1, ds.SOPClassUID, ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = io.BytesIO(path.read_bytes()[200:])
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    for primitive in list(message.encode_msg(assoc.accepted_contexts[0].context_id, 4000))[:2]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assoc.dul.socket.socket.sendall(pdu.encode())
    return assoc
