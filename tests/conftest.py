from __future__ import annotations

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
