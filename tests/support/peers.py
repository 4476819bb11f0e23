"""Real peers for tests and benchmarks: DCMTK tools by absolute path, free ports, the ClinicBox process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DCMTK_BIN = Path("/usr/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcmtk(tool: str) -> str:
    """Absolute path of a DCMTK tool (pynetdicom installs same-named scripts in the venv)."""
    path = DCMTK_BIN / tool
    if not path.exists():
        pytest.fail(f"DCMTK {tool} not found at {path}: install dcmtk (apt-get install -y dcmtk)")
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
    assert "dcmtk" in out.lower() or "offis" in out.lower(), f"{path} is not DCMTK's {tool}"
    return str(path)


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@contextlib.contextmanager
def storescp(out: Path, aet: str):
    """DCMTK storescp writing exactly the bytes it receives (+B) into ``out``: yields its port."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", aet, "+xa", "-od", str(out), "+B", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class ClinicBox:
    """``clinicbox serve`` as a real child process on a free loopback port, stopped by PID."""

    def __init__(self, data_dir: Path, port: int | None = None, ae_title: str = "CLINICBOX",
                 config: Path | None = None, env: dict | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.config = config
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-serve.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "clinicbox", "serve", "--data-dir", str(self.data_dir),
               "--port", str(self.port), "--ae-title", self.ae_title]
        if self.config:
            cmd += ["--config", str(self.config)]
        return cmd

    def start(self, timeout: float = 30.0) -> "ClinicBox":
        env = {**os.environ, **self.env}
        env.pop("CLINICBOX_CONFIG", None)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO)
        try:
            wait_for_port(self.port, timeout, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"clinicbox serve did not start:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        self.proc = None

    def __enter__(self) -> "ClinicBox":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "CLINICBOX_CONFIG"}
        return subprocess.run([sys.executable, "-m", "clinicbox", *args, "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, check=check, env=env, cwd=REPO)
