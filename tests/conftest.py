from __future__ import annotations

import subprocess

import pytest

from tests.support.peers import ClinicBox, dcmtk


@pytest.fixture
def server(tmp_path):
    """A fresh ``clinicbox serve`` process with its own data dir and port."""
    box = ClinicBox(tmp_path / "data")
    box.start()
    yield box
    box.stop()


@pytest.fixture(scope="session")
def storescu():
    return dcmtk("storescu")


@pytest.fixture(scope="session")
def echoscu():
    return dcmtk("echoscu")


@pytest.fixture
def small_fs(tmp_path):
    """A 12 MB tmpfs: a real filesystem that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (run as root): {r.stderr}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])
