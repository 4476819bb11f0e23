"""Helpers the benchmarks share: child processes stopped by PID, cache stages, percentiles."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_started: list[subprocess.Popen] = []  # every child started, so the final cleanup can reach it


def spawn(cmd: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd)
    _started.append(proc)
    return proc


def stop_process(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all_started() -> None:
    for proc in _started:
        stop_process(proc, timeout=20)


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what}: nothing listening on port {port} after {timeout:.0f} s")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stage_done(cache: Path, stage: str, key: dict) -> dict | None:
    try:
        info = json.loads((cache / f"{stage}.done.json").read_text())
        return info if info.get("key") == key else None
    except (OSError, ValueError):
        return None


def _stage_mark(cache: Path, stage: str, key: dict, info: dict) -> None:
    (cache / f"{stage}.done.json").write_text(json.dumps({"key": key, **info}, indent=2))


def _reset(cache: Path, *names: str) -> None:
    for name in names:
        p = cache / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
