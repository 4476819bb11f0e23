"""The answer writer: byte-identical to pydicom/pynetdicom encoding, PDUs within the peer's limit."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode

from clinicbox.archive.encode import encode_dataset
from clinicbox.dicom.answers import pdus, command_set


def _qr_answer() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Müller^Jürgen=ミュラー^ユルゲン"
    ds.PatientID = "X1"
    ds.StudyInstanceUID = "1.2.3.4.5"  # odd length: padded with NUL
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.NumberOfStudyRelatedInstances = 12
    ds.StudyDescription = ""
    ds.Rows = 512  # not a string element: written by pydicom
    ds.ReferencedStudySequence = []
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "US-ABD", "Abdomen"
    ds.ProcedureCodeSequence = [item, Dataset()]
    return ds


@pytest.mark.parametrize("implicit", [True, False])
def test_encoded_answers_match_pydicom(implicit):
    for charset in ("ISO_IR 192", "ISO_IR 100", None):
        ds = _qr_answer()
        if charset is None:
            del ds.SpecificCharacterSet
            ds.PatientName = "DOE^JOHN"
        elif charset == "ISO_IR 100":
            ds.SpecificCharacterSet = charset
            ds.PatientName = "Müller^Jürgen"
        assert encode_dataset(ds, implicit) == encode(ds, implicit, True, False), charset


def test_command_set_matches_pynetdicom():
    from pynetdicom.dimse_messages import C_FIND_RSP

    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.31"
    rsp.Status = 0xFF00
    rsp.Identifier = BytesIO(b"\x00\x00")  # any identifier: the command says a data set follows
    msg = C_FIND_RSP()
    msg.primitive_to_message(rsp)
    ours = command_set("1.2.840.10008.5.1.4.31", 0x8020, 7, 0xFF00)
    theirs = encode(msg.command_set, True, True)
    # the data set type value differs by convention only (any value but 0x0101 means "present")
    assert ours.replace(struct.pack("<HHIH", 0, 0x800, 2, 1), b"") == \
        theirs.replace(struct.pack("<HHIH", 0, 0x800, 2, msg.command_set.CommandDataSetType), b"")
    assert msg.command_set.CommandDataSetType != 0x0101


def test_pdus_respect_the_peers_maximum_and_reassemble():
    data = bytes(range(256)) * 40  # 10,240 bytes
    parts = pdus(3, data, False, 4096)
    assert len(parts) == 3
    body = b""
    for n, pdu in enumerate(parts):
        kind, _, length = struct.unpack(">BBI", pdu[:6])
        assert kind == 0x04 and length == len(pdu) - 6 and length <= 4096
        item_len, cx, header = struct.unpack(">IBB", pdu[6:12])
        assert cx == 3 and item_len == length - 4
        assert header == (0x02 if n == len(parts) - 1 else 0x00)  # data set; last fragment flagged
        body += pdu[12:]
    assert body == data
    [whole] = pdus(1, b"abcd", True, 0)  # 0: the peer sets no limit
    assert whole[11] == 0x03  # command, last fragment
