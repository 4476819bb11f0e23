"""Ingest benchmark: ClinicBox against Orthanc (as shipped and tuned) and DCMTK storescp, side by side.

Run by hand from the repository root::

    .venv/bin/python bench/ingest.py [--count 500] [--repeat 1] [--big-gb 1.0] [--skip-big]

What it does (see bench/README.md for more):

* writes ``--count`` synthetic 512x512 16-bit CT instances of one study/series (no patient data);
* for every receiver and scenario starts a FRESH receiver (own free loopback ports, own temp data
  dir), sends the instances with DCMTK ``storescu`` (``TCP_NODELAY=1`` in the sender's environment
  for every run), times the storescu process(es) by wall clock, checks every sender exited 0 and
  the receiver holds exactly ``--count`` instances, then stops the receiver by PID;
* scenarios: one association (one storescu, all files) and ``--senders`` (default 4) storescu
  processes in parallel, each with a quarter of the files;
* receivers: ClinicBox (``python -m clinicbox serve``), Orthanc as shipped, Orthanc with
  ``TCP_NODELAY=1``, DCMTK ``storescp +B`` with ``TCP_NODELAY=1`` (the socket-to-disk ceiling);
* ClinicBox memory: idle RSS one second after it listens, peak RSS (VmHWM) after the run;
* unless ``--skip-big``: one ~``--big-gb`` GiB multi-frame object sent to a fresh ClinicBox
  (time, peak RSS, stored byte-for-byte check);
* prints a table, the ratios against the targets, and writes JSON to bench/results/.

Every process it starts is stopped by PID, also when a run fails or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import numpy as np
    from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage, generate_uid

    from tests.support.peers import ClinicBox, free_port
    from tests.support.synth import ORG_ROOT, base_dataset, write_ct_series
except ImportError as exc:  # pragma: no cover - wrong interpreter
    sys.exit(f"bench/ingest.py: {exc}; run it with the project venv: .venv/bin/python bench/ingest.py")

STORESCU = "/usr/bin/storescu"   # absolute: pynetdicom installs a same-named script in the venv
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
RESULTS_DIR = REPO / "bench" / "results"
MB = 1e6
MIN_FREE_FOR_BIG = 5 * 2**30

# Targets (DESIGN.md section 10 and the benchmark brief)
TARGET_VS_ORTHANC_TUNED = 1.5
TARGET_VS_ORTHANC_SHIPPED = 10.0
TARGET_IDLE_RSS_MB = 150
TARGET_BIG_PEAK_RSS_MB = 300

SINGLE = "1 association"
KEEP = False   # --keep: leave every run's folder (receiver data, receiver and storescu logs) in place


def parallel_name(n: int) -> str:
    return f"{n} senders"


# ---------------------------------------------------------------------------------------------
# processes


_started: list[subprocess.Popen] = []   # every child we start, so the final cleanup can reach it


def spawn(cmd: list[str], *, log_path: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd)
    _started.append(proc)
    return proc


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. storescp --fork workers)."""
    pids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                pids += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    return pids


def stop_process(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """SIGTERM by PID, then SIGKILL if it does not exit in ``timeout`` seconds; children too."""
    if proc is None:
        return
    children = child_pids(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def stop_all_started() -> None:
    for proc in _started:
        if proc.poll() is None:
            stop_process(proc, timeout=10)


def listening(port: int) -> bool:
    """True when something LISTENs on ``port`` (read from /proc: no probe connection needed)."""
    hexport = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    if parts[1].endswith(hexport) and parts[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on port {port}")
        if listening(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what}: nothing listening on port {port} after {timeout:.0f} s")


def proc_status_mb(pid: int, key: str) -> float | None:
    """VmRSS / VmHWM of a process in MB (1e6 bytes), from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        return None
    return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads, plus reaped children) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    # after "(comm)": state is field 3, utime/stime/cutime/cstime are fields 14..17
    return sum(int(v) for v in fields[11:15]) / _CLK_TCK


def system_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, from the first line of /proc/stat)."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fh.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def top_cpu_processes(window: float = 0.5, n: int = 3) -> list[str]:
    """The busiest processes over ``window`` seconds (for a 'machine is busy' message)."""
    def ticks() -> dict[int, tuple[str, int]]:
        out = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        text = fh.read()
                except OSError:
                    continue
                fields = text.rpartition(")")[2].split()
                out[int(entry)] = (text[text.find("(") + 1:text.rfind(")")], int(fields[11]) + int(fields[12]))
        return out
    before = ticks()
    time.sleep(window)
    after = ticks()
    deltas = [(t - before[pid][1], pid, comm) for pid, (comm, t) in after.items() if pid in before]
    return [f"{pid} {comm} {100 * d / _CLK_TCK / window:.0f}%" for d, pid, comm in sorted(deltas, reverse=True)[:n] if d]


def others_busy_share(receiver_pid: int, window: float = 1.0) -> float:
    """Share of one CPU used by everything but the (idle) receiver and us, over ``window`` seconds."""
    sys0, rcv0, me0 = system_busy_s(), proc_cpu_s(receiver_pid) or 0.0, time.process_time()
    time.sleep(window)
    sys1, rcv1, me1 = system_busy_s(), proc_cpu_s(receiver_pid) or 0.0, time.process_time()
    return max(0.0, (sys1 - sys0) - (rcv1 - rcv0) - (me1 - me0)) / window


QUIET_SHARE = 0.15   # other processes together below 15 % of one CPU: quiet enough to measure


def wait_until_quiet(receiver_pid: int, max_wait: float) -> list[str]:
    """Wait (up to ``max_wait`` s) until other processes are quiet; return a description if they never were."""
    deadline = time.monotonic() + max_wait
    while True:
        share = others_busy_share(receiver_pid)
        if share < QUIET_SHARE:
            return []
        if time.monotonic() >= deadline:
            return [f"other processes used {100 * share:.0f}% of a CPU"] + top_cpu_processes()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def sync_disk() -> None:
    """Flush dirty pages so one run's writeback does not slow the next run's fsyncs."""
    os.sync()
    time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# receivers


class Receiver:
    key = ""
    label = ""
    ae_title = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.work.mkdir(parents=True)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc)

    def count(self) -> int:
        raise NotImplementedError

    def log_tail(self) -> str:
        return tail(self.work / "receiver.log")


class ClinicBoxReceiver(Receiver):
    key = "clinicbox"
    label = "ClinicBox"
    ae_title = "CLINICBOX"

    def start(self) -> None:
        # Only the bind address is set (loopback); everything else is ClinicBox's defaults.
        config = self.work / "clinicbox.toml"
        config.write_text('[server]\nbind = "127.0.0.1"\n')
        self.box = ClinicBox(self.work / "data", free_port(), ae_title=self.ae_title, config=config)
        self.port = self.box.port
        try:
            self.box.start(timeout=60)   # waits until the DICOM port accepts connections
        finally:
            if self.box.proc is not None:
                _started.append(self.box.proc)
        self.proc = self.box.proc

    def stop(self) -> None:
        if getattr(self, "box", None) is not None:
            self.box.stop()

    def studies(self) -> list[dict]:
        return json.loads(self.box.cli("studies", "--json").stdout)

    def count(self) -> int:
        return sum(int(s["num_instances"]) for s in self.studies())

    def log_tail(self) -> str:
        return tail(self.box.log_path)


class OrthancReceiver(Receiver):
    ae_title = "ORTHANC"

    def __init__(self, work: Path, tuned: bool) -> None:
        super().__init__(work)
        self.tuned = tuned
        self.key = "orthanc-tuned" if tuned else "orthanc-shipped"
        self.label = "Orthanc, TCP_NODELAY=1" if tuned else "Orthanc as shipped"
        self.http_port = 0

    def start(self) -> None:
        self.port, self.http_port = free_port(), free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.work / "storage"),
            "IndexDirectory": str(self.work / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "DicomServerEnabled": True,
            "HttpServerEnabled": True,
            "Plugins": [],
        }
        path = self.work / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        if self.tuned:
            env["TCP_NODELAY"] = "1"
        self.proc = spawn([ORTHANC, str(path)], log_path=self.work / "receiver.log", env=env, cwd=self.work)
        wait_listening(self.port, self.proc, "Orthanc")
        wait_listening(self.http_port, self.proc, "Orthanc (HTTP)")
        self._get("/system")

    def _get(self, path: str):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as resp:
            return json.load(resp)

    def count(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


class StorescpReceiver(Receiver):
    key = "storescp"
    label = "DCMTK storescp +B, TCP_NODELAY=1"
    ae_title = "STORESCP"

    def __init__(self, work: Path, fork: bool = False) -> None:
        super().__init__(work)
        self.fork = fork

    def start(self) -> None:
        self.port = free_port()
        self.out = self.work / "out"
        self.out.mkdir()
        cmd = [STORESCP, "-aet", self.ae_title, "-od", str(self.out), "+B"]
        if self.fork:
            cmd.append("--fork")    # one child per association, else parallel senders queue up
        cmd.append(str(self.port))
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = spawn(cmd, log_path=self.work / "receiver.log", env=env, cwd=self.work)
        wait_listening(self.port, self.proc, "storescp")

    def count(self) -> int:
        return sum(len(files) for _root, _dirs, files in os.walk(self.out))


RECEIVER_KEYS = ("clinicbox", "orthanc-tuned", "orthanc-shipped", "storescp")
LABELS = {"clinicbox": ClinicBoxReceiver.label, "orthanc-tuned": "Orthanc, TCP_NODELAY=1",
          "orthanc-shipped": "Orthanc as shipped", "storescp": StorescpReceiver.label}


def make_receiver(key: str, work: Path, senders: int) -> Receiver:
    if key == "clinicbox":
        return ClinicBoxReceiver(work)
    if key in ("orthanc-tuned", "orthanc-shipped"):
        return OrthancReceiver(work, tuned=key == "orthanc-tuned")
    if key == "storescp":
        return StorescpReceiver(work, fork=senders > 1)
    raise ValueError(key)


@contextmanager
def running(receiver: Receiver):
    try:
        receiver.start()
        yield receiver
    finally:
        receiver.stop()


# ---------------------------------------------------------------------------------------------
# sender


def sender_env() -> dict:
    return {**os.environ, "TCP_NODELAY": "1"}


def split(files: list[Path], n: int) -> list[list[Path]]:
    """``n`` contiguous groups of nearly equal size."""
    return [files[i * len(files) // n:(i + 1) * len(files) // n] for i in range(n)]


@dataclass
class Sent:
    seconds: float            # wall clock from the first storescu start until the last one exited
    sender_cpu_s: float       # user + system CPU of all storescu processes
    errors: list[str]


def send(files: list[Path], ae_title: str, port: int, senders: int, log_dir: Path) -> Sent:
    """Run ``senders`` storescu processes at once (one association each) and time them."""
    groups = [g for g in split(files, senders) if g]
    procs, logs = [], []
    env = sender_env()
    t0 = time.perf_counter()
    for i, group in enumerate(groups):
        log = log_dir / f"storescu-{i}.log"
        logs.append(log)
        procs.append(spawn([STORESCU, "-aec", ae_title, "127.0.0.1", str(port), *map(str, group)],
                           log_path=log, env=env))
    cpu = 0.0
    for proc in procs:
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
    seconds = time.perf_counter() - t0
    errors = [f"storescu #{i} exited {p.returncode}:\n{tail(logs[i])}" for i, p in enumerate(procs) if p.returncode]
    return Sent(seconds, cpu, errors)


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Run:
    receiver: str
    scenario: str
    repeat: int
    seconds: float
    sent: int
    stored: int
    ok: bool
    error: str = ""
    idle_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    receiver_cpu_s: float | None = None   # CPU the receiver used during the send
    sender_cpu_s: float | None = None
    other_cpu_s: float | None = None      # the rest of the machine (kernel threads, other processes) meanwhile
    busy_others: list[str] = field(default_factory=list)   # set when the machine was not quiet before the run

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Summary:
    receiver: str
    scenario: str
    runs: int
    failed: int
    best_s: float | None
    median_s: float | None
    best_rate: float | None
    median_rate: float | None
    mb_per_s: float | None
    receiver_cpu_s: float | None   # of the best run
    noisy_runs: int                # runs started while another process was busy


def summarize(runs: list[Run], count: int, total_bytes: int) -> list[Summary]:
    grouped: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        grouped[(r.scenario, r.receiver)].append(r)
    out = []
    for (scenario, receiver), rs in grouped.items():
        good = [r for r in rs if r.ok]
        best_run = min(good, key=lambda r: r.seconds) if good else None
        best = best_run.seconds if best_run else None
        median = statistics.median(r.seconds for r in good) if good else None
        out.append(Summary(receiver, scenario, len(rs), sum(not r.ok for r in rs), best, median,
                           count / best if best else None, count / median if median else None,
                           total_bytes / MB / best if best else None,
                           best_run.receiver_cpu_s if best_run else None,
                           sum(bool(r.busy_others) for r in rs)))
    return out


def find_summary(summaries: list[Summary], scenario: str, receiver: str) -> Summary | None:
    return next((s for s in summaries if s.scenario == scenario and s.receiver == receiver), None)


@dataclass
class Ratio:
    scenario: str
    other: str
    ratio: float | None
    target: float | None

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target


def ratios(summaries: list[Summary], scenarios: list[str]) -> list[Ratio]:
    out = []
    targets = {"orthanc-tuned": TARGET_VS_ORTHANC_TUNED, "orthanc-shipped": TARGET_VS_ORTHANC_SHIPPED,
               "storescp": None}
    for scenario in scenarios:
        cb = find_summary(summaries, scenario, "clinicbox")
        for other, target in targets.items():
            o = find_summary(summaries, scenario, other)
            if o is None:
                continue
            value = o.best_s / cb.best_s if (cb and cb.best_s and o.best_s) else None
            out.append(Ratio(scenario, other, value, target))
    return out


# ---------------------------------------------------------------------------------------------
# one timed run


def timed_run(key: str, scenario: str, senders: int, repeat: int, files: list[Path], work: Path,
              quiet_wait: float) -> Run:
    receiver = make_receiver(key, work, senders)
    run = Run(key, scenario, repeat, 0.0, len(files), 0, False)
    sync_disk()
    try:
        with running(receiver):
            time.sleep(1.0)   # settle after start-up (and: ClinicBox idle RSS is read 1 s after listening)
            if key == "clinicbox":
                run.idle_rss_mb = proc_status_mb(receiver.pid, "VmRSS")
            run.busy_others = wait_until_quiet(receiver.pid, quiet_wait)
            cpu0, sys0 = proc_cpu_s(receiver.pid), system_busy_s()
            sent = send(files, receiver.ae_title, receiver.port, senders, work)
            cpu1, sys1 = proc_cpu_s(receiver.pid), system_busy_s()
            run.seconds, run.sender_cpu_s, errors = sent.seconds, sent.sender_cpu_s, sent.errors
            if cpu0 is not None and cpu1 is not None:
                run.receiver_cpu_s = cpu1 - cpu0
                run.other_cpu_s = max(0.0, (sys1 - sys0) - run.receiver_cpu_s - run.sender_cpu_s)
            if key == "clinicbox":
                run.peak_rss_mb = proc_status_mb(receiver.pid, "VmHWM")
            run.stored = receiver.count()
            if errors:
                run.error = "; ".join(errors)
            elif run.stored != len(files):
                run.error = f"receiver holds {run.stored} instances, expected {len(files)}"
            else:
                run.ok = True
            if not run.ok:
                run.error += "\n--- receiver log ---\n" + receiver.log_tail()
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}\n--- receiver log ---\n{receiver.log_tail()}"
    finally:
        if not KEEP:
            shutil.rmtree(work, ignore_errors=True)
    return run


def print_progress(run: Run) -> None:
    label = LABELS[run.receiver]
    if run.busy_others:
        print(f"  WARNING: machine not quiet before this run: {', '.join(run.busy_others)}", flush=True)
    if run.ok:
        extra = (f"  CPU s: receiver {fmt(run.receiver_cpu_s, '.2f')}, senders {fmt(run.sender_cpu_s, '.2f')}, "
                 f"rest {fmt(run.other_cpu_s, '.2f')}")
        if run.idle_rss_mb is not None:
            extra += f"; idle RSS {run.idle_rss_mb:.0f} MB, peak RSS {run.peak_rss_mb:.0f} MB"
        print(f"  [{run.scenario:<13}] {label:<34} {run.seconds:7.2f} s  {run.rate:7.0f} inst/s{extra}", flush=True)
    else:
        print(f"  [{run.scenario:<13}] {label:<34} FAILED: {run.error}", flush=True)


# ---------------------------------------------------------------------------------------------
# profiling (optional): one extra, untimed ClinicBox run under py-spy


def find_py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


PROFILE_MODES = {
    "wall": ["--idle"],   # every thread, waiting included: where each thread's wall time goes
    "cpu": [],            # py-spy's default: threads it thinks are running
    "gil": ["--gil"],     # only the thread holding the GIL: pure Python work
}


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py:123)'."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1]}" if where else func


def analyse_stacks(raw: Path, n: int = 12, depth: int = 3) -> dict:
    """Sample counts from py-spy's ``--format raw --threads`` output: overall self/inclusive per function,
    and per thread the most frequent innermost ``depth`` frames (leaf <- caller <- caller)."""
    self_c, incl_c, threads = Counter(), Counter(), Counter()
    per_thread: dict[str, Counter] = defaultdict(Counter)
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread (", "process ")) else "?"
        funcs = [_frame_name(f) for f in frames if not f.startswith(("thread (", "process "))]
        threads[thread] += c
        if funcs:
            self_c[funcs[-1]] += c
            per_thread[thread][" <- ".join(reversed(funcs[-depth:]))] += c
        for f in set(funcs):
            incl_c[f] += c
    return {"total_samples": total, "self": self_c.most_common(n), "inclusive": incl_c.most_common(n),
            "threads": [(t, c, per_thread[t].most_common(n)) for t, c in threads.most_common(8)]}


def profile_clinicbox(files: list[Path], work: Path, senders: int, rate: int, mode: str,
                      out_dir: Path) -> dict | None:
    """One extra, untimed ClinicBox run with py-spy attached (record, raw collapsed stacks)."""
    py_spy = find_py_spy()
    if py_spy is None:
        print("  py-spy not found: `.venv/bin/pip install py-spy` (not a project dependency)")
        return None
    scenario = SINGLE if senders == 1 else parallel_name(senders)
    raw = out_dir / f"clinicbox-{senders}-senders-{mode}.txt"   # collapsed stacks: flamegraph.pl, speedscope
    receiver = ClinicBoxReceiver(work)
    sync_disk()
    try:
        with running(receiver):
            time.sleep(1.0)
            spy = spawn([py_spy, "record", "--pid", str(receiver.pid), "--rate", str(rate), "--threads",
                         *PROFILE_MODES[mode], "--format", "raw", "-o", str(raw)], log_path=work / "py-spy.log")
            time.sleep(1.0)   # let py-spy attach
            sent = send(files, receiver.ae_title, receiver.port, senders, work)
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                stop_process(spy)
            if sent.errors or not raw.exists():
                print(f"  profiling run failed: {sent.errors or tail(work / 'py-spy.log')}")
                return None
            return {"scenario": scenario, "mode": mode, "seconds_under_profiler": sent.seconds, "rate_hz": rate,
                    "raw": str(raw), **analyse_stacks(raw)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_profile(p: dict) -> None:
    total = max(p["total_samples"], 1)
    what = {"wall": "all threads, waiting included", "cpu": "threads py-spy sees running",
            "gil": "the thread holding the GIL"}[p["mode"]]
    print(f"\nProfile of ClinicBox, {p['scenario']}: py-spy {p['mode']} mode ({what}), {p['rate_hz']} Hz, "
          f"{total} samples; the send took {p['seconds_under_profiler']:.2f} s under the profiler")
    print(f"  collapsed stacks (flamegraph.pl / speedscope): {p['raw']}")
    quiet = []
    for name, c, top in p["threads"]:
        if top and top[0][1] >= 0.95 * c:   # one stack all the time: a thread that only waited
            quiet.append(f"{name} ({top[0][0].split(' <- ')[0]})")
            continue
        print(f"  {name}: {c} samples")
        for stack, k in top[:8]:
            print(f"    {100 * k / max(c, 1):5.1f}%  {stack[:160]}")
    if quiet:
        print("  threads that only waited: " + "; ".join(quiet))
    if p["mode"] != "wall":
        print("  top functions, all threads (self samples):")
        for name, c in p["self"]:
            print(f"    {100 * c / total:5.1f}%  {name[:150]}")


# ---------------------------------------------------------------------------------------------
# large object


def write_big_multiframe(path: Path, gib: float, rows: int = 512, cols: int = 512) -> int:
    """One multi-frame grayscale word Secondary Capture, ~``gib`` GiB of 16-bit frames, streamed to disk.

    The header is written by pydicom; Pixel Data (explicit VR LE, OW, defined length) is appended
    frame block by frame block, so memory stays small. No patient data. Returns the frame count.
    """
    frame_bytes = rows * cols * 2
    frames = max(1, round(gib * 2**30 / frame_bytes))
    if frames * frame_bytes >= 2**32 - 1:
        raise ValueError("--big-gb too large for one defined-length Pixel Data element (< 4 GiB)")
    ds = base_dataset(MultiFrameGrayscaleWordSecondaryCaptureImageStorage, generate_uid(prefix=ORG_ROOT),
                      generate_uid(prefix=ORG_ROOT), modality="OT", patient_id="SYNBIG01",
                      patient_name="Synthetic^Big", accession="ACCBIG01",
                      study_description="Synthetic large multi-frame", series_description="Benchmark")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063   # Frame Time
    ds.FrameTime = 40.0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(2026)
    block = 32
    with open(path, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        for start in range(0, frames, block):
            n = min(block, frames - start)
            fh.write(rng.integers(0, 4096, size=(n, rows, cols), dtype=np.uint16).tobytes())
    return frames


def dataset_offset(path: Path) -> int:
    """Offset of the data set in a Part 10 file (after preamble, DICM and the file meta group)."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    if head[128:132] != b"DICM":
        raise ValueError(f"{path} is not a Part 10 file")
    (group_length,) = struct.unpack_from("<I", head, 140)
    return 144 + group_length


def dataset_digest(path: Path) -> tuple[int, str]:
    """(length, SHA-256) of the data set part of a Part 10 file, read in chunks."""
    offset = dataset_offset(path)
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return path.stat().st_size - offset, h.hexdigest()


@dataclass
class BigResult:
    skipped: str = ""
    frames: int = 0
    file_bytes: int = 0
    seconds: float | None = None
    idle_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    stored_instances: int | None = None
    stored_size_bytes: int | None = None
    dataset_matches: bool | None = None
    ok: bool = False
    error: str = ""


def big_object_run(tmp: Path, gib: float) -> BigResult:
    free = shutil.disk_usage(tmp).free
    if free < MIN_FREE_FOR_BIG:
        return BigResult(skipped=f"only {free / 2**30:.1f} GiB free in {tmp} (need 5 GiB)")
    res = BigResult()
    src = tmp / "big" / "big-mf.dcm"
    src.parent.mkdir()
    work = tmp / "big-clinicbox"
    try:
        t0 = time.perf_counter()
        res.frames = write_big_multiframe(src, gib)
        res.file_bytes = src.stat().st_size
        print(f"  wrote {res.frames} frames, {res.file_bytes / MB:.0f} MB in {time.perf_counter() - t0:.1f} s")
        sync_disk()
        receiver = ClinicBoxReceiver(work)
        with running(receiver):
            time.sleep(1.0)
            res.idle_rss_mb = proc_status_mb(receiver.pid, "VmRSS")
            sent = send([src], receiver.ae_title, receiver.port, 1, work)
            res.seconds, errors = sent.seconds, sent.errors
            res.peak_rss_mb = proc_status_mb(receiver.pid, "VmHWM")
            studies = receiver.studies()
            res.stored_instances = sum(int(s["num_instances"]) for s in studies)
            res.stored_size_bytes = sum(int(s["size_bytes"] or 0) for s in studies)
            stored = [p for p in (work / "data" / "objects").rglob("*.dcm")]
            problems = list(errors)
            if res.stored_instances != 1 or len(stored) != 1:
                problems.append(f"expected 1 stored instance, index says {res.stored_instances}, "
                                f"{len(stored)} object file(s) on disk")
            else:
                if stored[0].stat().st_size != res.stored_size_bytes:
                    problems.append(f"stored file is {stored[0].stat().st_size} bytes, "
                                    f"index says {res.stored_size_bytes}")
                res.dataset_matches = dataset_digest(stored[0]) == dataset_digest(src)
                if not res.dataset_matches:
                    problems.append("stored data set differs from the sent one (length or SHA-256)")
            res.ok = not problems
            res.error = "; ".join(problems)
            if problems:
                res.error += "\n--- receiver log ---\n" + receiver.log_tail()
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(src.parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------
# environment and report


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except OSError as exc:
        return f"unavailable ({exc})"
    return out.strip().splitlines()[0] if out.strip() else "?"


def environment() -> dict:
    import pydicom
    import pynetdicom

    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip()
    return {
        "clinicbox_git": git, "python": platform.python_version(), "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__, "orthanc": tool_version([ORTHANC, "--version"]),
        "storescu": tool_version([STORESCU, "--version"]), "kernel": platform.release(),
        "cpus": os.cpu_count(), "host": socket.gethostname(),
    }


def check_tools() -> None:
    for tool in (STORESCU, STORESCP, ORTHANC):
        if not os.access(tool, os.X_OK):
            sys.exit(f"bench/ingest.py: {tool} not found (apt-get install -y dcmtk orthanc)")
    for tool in (STORESCU, STORESCP):
        text = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.lower()
        if "dcmtk" not in text:
            sys.exit(f"bench/ingest.py: {tool} is not DCMTK's")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(args, summaries: list[Summary], scenarios: list[str], rats: list[Ratio], runs: list[Run],
                 big: BigResult | None, per_file: float) -> bool:
    print(f"\n=== Results: {args.count} x 512x512 16-bit CT ({per_file / MB:.2f} MB each), "
          f"repeat {args.repeat}: best and median wall time of the storescu process(es) ===")
    print("Sender: DCMTK storescu, TCP_NODELAY=1 in the sender's environment for every run; "
          "one association per storescu process.")
    print("Durability before Success: ClinicBox fsync(file) + fsync(dir) + index commit; Orthanc 1.10 fdatasync(file) "
          "(SyncStorageArea, on by default); storescp none. storescp runs with --fork when senders > 1.")
    header = (f"{'scenario':<14} {'receiver':<34} {'best s':>7} {'median s':>8} {'inst/s':>7} {'inst/s med':>10} "
              f"{'MB/s':>6} {'rcv CPU s':>9}  runs")
    print(header)
    print("-" * len(header))
    for scenario in scenarios:
        for key in RECEIVER_KEYS:
            s = find_summary(summaries, scenario, key)
            if s is None:
                continue
            failed = f" ({s.failed} FAILED)" if s.failed else ""
            noisy = f" ({s.noisy_runs} on a busy machine)" if s.noisy_runs else ""
            print(f"{scenario:<14} {LABELS[key]:<34} {fmt(s.best_s, '7.2f')} {fmt(s.median_s, '8.2f')} "
                  f"{fmt(s.best_rate, '7.0f')} {fmt(s.median_rate, '10.0f')} {fmt(s.mb_per_s, '6.0f')} "
                  f"{fmt(s.receiver_cpu_s, '9.2f')}  {s.runs}{failed}{noisy}")
    print("rcv CPU s = user+system CPU of the receiver process during the best run's send "
          "(storescp --fork: children included once reaped)")

    all_met = True
    print("\nClinicBox throughput / other receiver's throughput (best times):")
    for r in rats:
        if r.target is None:
            verdict = "(reference)"
        elif r.met is None:
            verdict = f"target >= {r.target:g}x: NOT MEASURED"
            all_met = False
        else:
            verdict = f"target >= {r.target:g}x: {'MET' if r.met else 'MISSED'}"
            all_met &= bool(r.met)
        print(f"  {r.scenario:<14} vs {LABELS[r.other]:<34} {fmt(r.ratio, '6.2f')}x   {verdict}")

    cb_runs = [r for r in runs if r.receiver == "clinicbox" and r.ok]
    if cb_runs:
        idle = max(r.idle_rss_mb or 0 for r in cb_runs)
        met = idle < TARGET_IDLE_RSS_MB
        all_met &= met
        print("\nClinicBox memory (python -m clinicbox serve, /proc/PID/status):")
        print(f"  idle RSS 1 s after listening: {idle:.0f} MB (max over runs)   "
              f"target < {TARGET_IDLE_RSS_MB} MB: {'MET' if met else 'MISSED'}")
        for scenario in scenarios:
            peaks = [r.peak_rss_mb for r in cb_runs if r.scenario == scenario and r.peak_rss_mb is not None]
            if peaks:
                print(f"  peak RSS (VmHWM) after {args.count} instances, {scenario}: {max(peaks):.0f} MB")

    if big is not None:
        print("\nLarge object -> fresh ClinicBox (one storescu association):")
        if big.skipped:
            print(f"  skipped: {big.skipped}")
        elif big.seconds is None:
            print(f"  FAILED: {big.error}")
            all_met = False
        else:
            print(f"  {big.frames} frames x 512x512x16 bit, multi-frame grayscale word SC, "
                  f"{big.file_bytes / MB:.0f} MB file")
            print(f"  sent in {big.seconds:.2f} s ({big.file_bytes / MB / big.seconds:.0f} MB/s); "
                  f"idle RSS {fmt(big.idle_rss_mb, '.0f')} MB")
            met = big.peak_rss_mb is not None and big.peak_rss_mb < TARGET_BIG_PEAK_RSS_MB
            all_met &= met
            print(f"  ClinicBox peak RSS (VmHWM): {fmt(big.peak_rss_mb, '.0f')} MB   "
                  f"target < {TARGET_BIG_PEAK_RSS_MB} MB: {'MET' if met else 'MISSED'}")
            print(f"  stored: {big.stored_instances} instance(s), index size {big.stored_size_bytes} bytes = file size, "
                  f"data set identical to the sent one: {big.dataset_matches}" if big.ok else f"  CHECK FAILED: {big.error}")
    return all_met


# ---------------------------------------------------------------------------------------------


def _sigterm_as_interrupt(_signum, _frame) -> None:
    """SIGTERM behaves like Ctrl-C, so the finally blocks stop every receiver."""
    raise KeyboardInterrupt


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=500, help="CT instances to send (default 500)")
    p.add_argument("--senders", type=int, default=4, help="storescu processes in the parallel scenario (default 4)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per receiver and scenario (default 1)")
    p.add_argument("--big-gb", type=float, default=1.0, help="size of the large object in GiB (default 1.0)")
    p.add_argument("--skip-big", action="store_true", help="skip the large-object run")
    p.add_argument("--skip-shipped", action="store_true", help="skip Orthanc as shipped (about 25 s per run)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, one untimed ClinicBox run (each scenario) under py-spy; print top functions")
    p.add_argument("--profile-mode", choices=sorted(PROFILE_MODES), default="wall",
                   help="wall: every thread incl. waiting (default); cpu: running threads; gil: GIL holder only")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    p.add_argument("--tmp-dir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the temp folders go (default: system temp dir)")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each run wait up to this many seconds for other busy processes to calm down "
                        "(default 30); runs started on a busy machine are flagged")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp folder: sent files and each run's receiver data and logs (~0.3 GB per run)")
    p.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    args = p.parse_args(argv)
    if args.count < 1 or args.repeat < 1 or args.senders < 1:
        p.error("--count, --repeat and --senders must be >= 1")
    return args


def main(argv=None) -> int:
    global KEEP
    args = parse_args(argv)
    KEEP = args.keep
    check_tools()
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="clinicbox-bench-", dir=args.tmp_dir))
    started = datetime.now()
    runs: list[Run] = []
    big: BigResult | None = None
    profiles: list[dict] = []
    env = environment()
    scenarios = [SINGLE] + ([parallel_name(args.senders)] if args.senders > 1 else [])
    keys = [k for k in RECEIVER_KEYS if not (args.skip_shipped and k == "orthanc-shipped")]
    try:
        print(f"ClinicBox ingest benchmark ({env['clinicbox_git']}; pynetdicom {env['pynetdicom']}, "
              f"{env['orthanc']}, {env['storescu']}; {env['cpus']} CPUs)")
        print(f"temp folder: {tmp}")
        t0 = time.perf_counter()
        files = write_ct_series(tmp / "series", args.count)
        total_bytes = sum(f.stat().st_size for f in files)
        per_file = total_bytes / len(files)
        print(f"wrote {len(files)} CT instances, {total_bytes / MB:.0f} MB, in {time.perf_counter() - t0:.1f} s")
        print("each run: fresh receiver (own ports and data dir), sync, settle 1 s, wait until no other process "
              "is busy, send, verify count, stop by PID")
        with open("/proc/loadavg") as fh:
            print(f"load average at start: {' '.join(fh.read().split()[:3])}")

        n = 0
        for rep in range(1, args.repeat + 1):
            for scenario in scenarios:
                senders = 1 if scenario == SINGLE else args.senders
                for key in keys:
                    n += 1
                    run = timed_run(key, scenario, senders, rep, files, tmp / f"run{n:03d}-{key}", args.quiet_wait)
                    runs.append(run)
                    print_progress(run)

        if args.profile:
            print("\nprofiling ClinicBox (untimed extra runs)...")
            prof_dir = RESULTS_DIR / f"profile-{started:%Y%m%d-%H%M%S}"
            prof_dir.mkdir(parents=True, exist_ok=True)
            for scenario in scenarios:
                senders = 1 if scenario == SINGLE else args.senders
                p = profile_clinicbox(files, tmp / f"profile-{senders}", senders, args.profile_rate,
                                      args.profile_mode, prof_dir)
                if p:
                    profiles.append(p)

        if not args.skip_big:
            print(f"\nlarge object ({args.big_gb:g} GiB)...")
            big = big_object_run(tmp, args.big_gb)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping receivers", file=sys.stderr)
        return 130
    finally:
        stop_all_started()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    summaries = summarize(runs, args.count, total_bytes)
    rats = ratios(summaries, scenarios)
    all_met = print_report(args, summaries, scenarios, rats, runs, big, per_file)
    for p in profiles:
        print_profile(p)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"ingest-{started:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "args": {k: str(v) for k, v in vars(args).items()},
        "environment": env, "sender": "DCMTK storescu, TCP_NODELAY=1 in its environment, one association per process",
        "instance_bytes": per_file, "runs": [asdict(r) | {"rate": r.rate} for r in runs],
        "summary": [asdict(s) for s in summaries],
        "ratios": [asdict(r) | {"met": r.met} for r in rats],
        "targets": {"vs_orthanc_tuned": TARGET_VS_ORTHANC_TUNED, "vs_orthanc_shipped": TARGET_VS_ORTHANC_SHIPPED,
                    "idle_rss_mb": TARGET_IDLE_RSS_MB, "big_peak_rss_mb": TARGET_BIG_PEAK_RSS_MB},
        "all_targets_met": all_met, "big": asdict(big) if big else None, "profiles": profiles,
    }, indent=2))
    print(f"\nresults: {out.relative_to(REPO)}")
    print(f"all targets met: {'yes' if all_met else 'NO'}")
    failed = [r for r in runs if not r.ok] + ([big] if big and not big.ok and not big.skipped else [])
    if failed:
        return 1
    return 3 if (args.strict and not all_met) else 0


if __name__ == "__main__":
    sys.exit(main())
