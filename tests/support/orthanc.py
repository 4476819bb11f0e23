"""Orthanc from Debian as a real peer: own config, ports and data in a temp dir, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.peers import free_port, wait_for_port

ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict | None = None) -> None:
        if not Path(ORTHANC).exists():
            pytest.fail("Orthanc not installed (apt-get install -y orthanc)")
        self.folder = Path(folder)
        self.aet = aet
        self.dicom_port, self.http_port = free_port(), free_port()
        self.modalities = modalities or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "clinicbox-test-peer", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": self.modalities, "Plugins": [], "DicomScpTimeout": 10,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        self._log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(path)], stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        wait_for_port(self.http_port, 30, self.proc)
        wait_for_port(self.dicom_port, 30, self.proc)
        return self

    def rest(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=60) as rsp:
            return json.loads(rsp.read() or b"null")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
        self.proc = None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
