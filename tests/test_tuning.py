"""The pynetdicom adjustments: fail loudly if pynetdicom changes shape; the receive sink hashes right."""

from __future__ import annotations

import hashlib
import os

import pynetdicom

from clinicbox.dicom import tuning


def test_installed_pynetdicom_fits_the_tuning():
    tuning.install()  # raises RuntimeError naming what changed
    assert pynetdicom._config.STORE_RECV_CHUNKED_DATASET is True
    assert pynetdicom.dimse_messages.NamedTemporaryFile is tuning._named_temporary_file
    assert isinstance(pynetdicom.dul.time, tuning._EventTime)
    assert pynetdicom.transport.AssociationSocket.recv is tuning._recv


def test_incoming_file_hashes_the_data_set_across_any_chunking(tmp_path):
    meta_body = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"  # any meta elements after the length
    group_length = len(meta_body).to_bytes(4, "little")
    head = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + group_length + meta_body
    data_set = os.urandom(10000)
    whole = head + data_set
    for cuts in ([128, 132, len(head)], [3, 140, 145, 9000], [len(whole)]):
        path = tmp_path / f"f{cuts[0]}"
        f = tuning.IncomingFile(os.open(path, os.O_WRONLY | os.O_CREAT), path)
        prev = 0
        for c in [*cuts, len(whole)]:
            f.write(whole[prev:c])
            prev = c
        f.close()
        assert path.read_bytes() == whole
        assert f.dataset_sha256 == hashlib.sha256(data_set).hexdigest()


def test_incoming_file_keeps_write_errors(tmp_path):
    path = tmp_path / "x"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    f = tuning.IncomingFile(fd, path)
    os.close(fd)  # writing now fails with EBADF, as ENOSPC would
    assert f.write(b"abc") == 3
    assert isinstance(f.error, OSError)
    f._fd = None
    f._finalizer.detach()  # its fd number is closed already and may belong to another file by now
