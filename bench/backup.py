"""Backup benchmark: a full backup of a 5,000-instance archive and an incremental one, against ``cp -r``.

Run by hand from the repository root::

    .venv/bin/python bench/backup.py [--studies 50] [--per-study 100] [--size 512] [--new 100] [--repeat 3]

What it does (see bench/README.md for more):

* generates ``--studies`` x ``--per-study`` synthetic CT instances of ``--size``² 16-bit pixels
  (``tests/support/synth.py``, one patient per study, no patient data) plus one more study of
  ``--new`` instances, and loads the first set into a data dir through the project's own import
  path (``clinicbox import``); all of it cached in ``--cache`` (keyed by ``GEN_VERSION`` and the
  sizes) so the next run skips the build;
* every repeat works on a fresh copy of that data dir (index copied, object files hard-linked: the
  same inodes, so the same page cache), reads every object once (warm-up: every variant reads from
  the page cache; dropping it needs root), runs ``sync`` before each timed variant, and times, in
  an order rotated per repeat:
  ``cp -r DATA/objects DEST``; ``cp -r`` then ``sync``; ``clinicbox backup run --to EMPTY`` (the
  CLI, wall time of the process); ``run_backup()`` in this process to another empty target;
  then imports the ``--new`` instances into both copies (untimed) and times the incremental backup
  to the same targets, CLI and in-process;
* prints a table (best and median), the ratios and the target verdicts (full backup within 1.5x of
  ``cp -r`` + ``sync``, incremental under 5 % of the full one), writes JSON to bench/results/;
  when the full backup misses its target (or with ``--profile``) records one more CLI backup under
  py-spy and times the phases in-process (hash, read, copy, sync, snapshot, workers 1/2/4).

Every process it starts is stopped by PID, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import datetime
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    from clinicbox.archive.parse import dataset_offset
    from clinicbox.jobs.backup import CHUNK, _snapshot, run_backup
    from tests.support.synth import write_ct_series
except ImportError as exc:  # pragma: no cover - wrong interpreter
    sys.exit(f"bench/backup.py: {exc}; run it with the project venv: .venv/bin/python bench/backup.py")

# every target here is on the data's own disk, as a benchmark's must be: the warning saying so is noise
logging.getLogger("clinicbox.jobs.backup").setLevel(logging.ERROR)

PYSPY = REPO / ".venv" / "bin" / "py-spy"
RESULTS_DIR = REPO / "bench" / "results"
GEN_VERSION = 1            # bump when the generated data changes (invalidates the cache)

TARGET_VS_CP = 1.5         # full backup time <= 1.5 x cp -r (+ sync)
TARGET_INCR_SHARE = 0.05   # incremental backup time < 5 % of the full one

_started: list[subprocess.Popen] = []


# ---------------------------------------------------------------------------------------------
# processes

def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command to completion; the process is registered so Ctrl-C stops it by PID."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)
    _started.append(proc)
    out, err = proc.communicate()
    _started.remove(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all_started() -> None:
    for proc in list(_started):
        stop_process(proc)


def checked(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = run(cmd, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}: {r.stderr.strip()[-800:]}")
    return r


def clinicbox_cmd(*args: str, data_dir: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "clinicbox", *args, "--data-dir", str(data_dir), "--config", str(config)]


def cli_env() -> dict:
    # PYTHONDONTWRITEBYTECODE (set on some dev machines) would make every CLI run compile ClinicBox from
    # source; an installed appliance has its .pyc files (pip compiles them), and so does this bench
    return {k: v for k, v in os.environ.items() if k not in ("CLINICBOX_CONFIG", "PYTHONDONTWRITEBYTECODE")}


def compile_program() -> None:
    """Byte-compile ClinicBox as `pip install` does on the appliance (once, before anything is timed)."""
    checked([sys.executable, "-m", "compileall", "-q", str(REPO / "clinicbox")])


def sync() -> None:
    checked(["sync"])


COLD = {"on": False}


def settle() -> None:
    """Before a timed variant: everything written out, and with --cold the page cache dropped too
    (each variant then reads the objects from disk, as a nightly backup does)."""
    sync()
    if COLD["on"]:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        # ... but not the program: on the appliance `clinicbox serve` runs all day from the same venv,
        # so the interpreter and ClinicBox's modules are in memory when someone types `backup run`
        subprocess.run([sys.executable, "-c", "import clinicbox.cli, clinicbox.jobs.runner, clinicbox.jobs.backup"],
                       check=True, cwd=REPO, env=cli_env())
        time.sleep(0.5)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def system_busy_s() -> float:
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fh.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def busy_share(window: float = 1.0) -> float:
    """CPU share the machine used (all processes) during ``window`` s while this one sleeps."""
    b0 = system_busy_s()
    time.sleep(window)
    return (system_busy_s() - b0) / window


# ---------------------------------------------------------------------------------------------
# build (cached)

def _write_study(args) -> int:
    folder, count, size, patient_id = args
    write_ct_series(Path(folder), count, rows=size, cols=size, patient_id=patient_id)
    return count


def tree_bytes(folder: Path) -> tuple[int, int]:
    n = size = 0
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            n += 1
            size += os.path.getsize(os.path.join(dirpath, f))
    return n, size


def build(cache: Path, key: dict, config: Path, rebuild: bool) -> dict:
    done = cache / "built.json"
    if not rebuild:
        try:
            info = json.loads(done.read_text())
            if info.get("key") == key:
                print(f"reusing the archive in {cache / 'base'}")
                # built by an older ClinicBox: apply the index migrations once here, else only the CLI
                # variants would (the in-process run_backup opens no archive) and pay for it in their time
                checked([sys.executable, "-m", "clinicbox", "status", "--data-dir", str(cache / "base")])
                return info
        except (OSError, ValueError):
            pass
    for name in ("files", "new", "base", "built.json"):
        p = cache / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    jobs = [(str(cache / "files" / f"s{i:03d}"), key["per_study"], key["size"], f"BK{i:04d}")
            for i in range(key["studies"])]
    jobs.append((str(cache / "new"), key["new"], key["size"], "BKNEW"))
    print(f"writing {key['studies']} x {key['per_study']} + {key['new']} synthetic CT files "
          f"({key['size']}x{key['size']}) ...", flush=True)
    with Pool(2) as pool:
        pool.map(_write_study, jobs)
    print(f"importing into {cache / 'base'} (clinicbox import) ...", flush=True)
    r = checked(clinicbox_cmd("import", "--quiet", str(cache / "files"), data_dir=cache / "base", config=config),
                env=cli_env(), cwd=REPO)
    n, size = tree_bytes(cache / "base" / "objects")
    new_n, new_size = tree_bytes(cache / "new")
    info = {"key": key, "import": r.stdout.strip(), "objects": n, "objects_bytes": size, "new_files": new_n,
            "new_bytes": new_size, "build_s": round(time.monotonic() - t0, 1)}
    expected = key["studies"] * key["per_study"]
    if n != expected:
        raise RuntimeError(f"the archive holds {n} object files, expected {expected}: {r.stdout}")
    done.write_text(json.dumps(info, indent=2))
    return info


def fresh_copy(base: Path, dest: Path) -> None:
    """A data dir like ``base``: index (and any other file) copied, object files hard-linked."""
    dest.mkdir(parents=True)
    for entry in base.iterdir():
        if entry.name == "objects":
            checked(["cp", "-al", str(entry), str(dest / "objects")])
        elif entry.is_dir():
            shutil.copytree(entry, dest / entry.name)
        elif not entry.name.startswith("job-"):
            shutil.copy2(entry, dest / entry.name)


def warm(folder: Path) -> tuple[int, float]:
    """Read every file under ``folder`` once (into the page cache)."""
    t0 = time.perf_counter()
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                while chunk := fh.read(CHUNK):
                    total += len(chunk)
    return total, time.perf_counter() - t0


def rm(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# measured variants

def time_cmd(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = run(cmd, **kw)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}: {r.stderr.strip()[-800:]}")
    return dt, r


def cp_r(src: Path, dest: Path, with_sync: bool) -> float:
    t0 = time.perf_counter()
    checked(["cp", "-r", str(src), str(dest)])
    if with_sync:
        checked(["sync"])
    return time.perf_counter() - t0


def cli_backup(data_dir: Path, target: Path, config: Path) -> dict:
    dt, r = time_cmd(clinicbox_cmd("backup", "run", "--to", str(target), data_dir=data_dir, config=config),
                     env=cli_env(), cwd=REPO)
    # "backup ID: N instances, C copied (X MB), R already there, S s"
    line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    inner = None
    try:
        inner = float(line.rsplit(",", 1)[1].strip().removesuffix(" s"))
    except (IndexError, ValueError):
        pass
    parts = line.split()
    figures = {}
    try:
        figures = {"instances": int(parts[2]), "copied": int(parts[4])}
    except (IndexError, ValueError):
        pass
    return {"s": dt, "run_backup_s": inner, "output": line, **figures}


def inproc_backup(data_dir: Path, target: Path, workers: int = 2) -> dict:
    t0 = time.perf_counter()
    res = run_backup(data_dir, target, workers=workers)
    dt = time.perf_counter() - t0
    f = res.figures()
    return {"s": dt, "instances": f["instances"], "copied": f["copied"], "copied_bytes": f["copied_bytes"],
            "reused": f["reused"]}


def import_new(data_dir: Path, new: Path, config: Path) -> str:
    return checked(clinicbox_cmd("import", "--quiet", str(new), data_dir=data_dir, config=config),
                   env=cli_env(), cwd=REPO).stdout.strip()


# ---------------------------------------------------------------------------------------------
# profile

PHASE_BY_SOURCE = [  # (substring of the innermost clinicbox/jobs/backup.py source line, phase)
    ("h.update", "hash (sha256)"), ("fout.write", "write"), ("fin.read", "read"), ("open(src", "open"),
    ("os.replace", "rename"), ("dataset_offset", "parse header"), ("os.sync", "sync"),
    ("mkdir", "mkdir"), ("is_file", "stat (reuse check)"), ("stat()", "stat (reuse check)"),
    ("unlink", "unlink"), ("json.dump", "manifest"), ("fsync", "manifest"), ("prune", "prune"),
]


def classify(stack: list[str], backup_src: list[str]) -> str | None:
    """Phase of one py-spy stack (outermost first); None for idle waits."""
    joined = ";".join(stack)
    inner = stack[-1] if stack else ""
    # py-spy names frames "Class.method (path:line)"; a thread blocked in one of these is waiting
    if any(inner.startswith(w) for w in ("Condition.wait (", "Event.wait (", "Future.result (", "_worker (",
                                          "Thread._wait_for_tstate_lock (", "Thread.join (", "Queue.get (",
                                          "IndexWriter._run (")) or "result_iterator" in inner:
        return None
    if "_snapshot (" in joined:
        return "snapshot (VACUUM INTO)"
    if "prune (" in joined:
        return "prune"
    if "_latest_manifest_objects" in joined or "list_backups" in joined:
        return "read previous manifest"
    for frame in reversed(stack):
        if "clinicbox/jobs/backup.py:" in frame:
            try:
                line = backup_src[int(frame.rsplit(":", 1)[1].rstrip(")")) - 1]
            except (IndexError, ValueError):
                break
            for needle, phase in PHASE_BY_SOURCE:
                if needle in line:
                    return phase
            return f"other backup.py: {line.strip()[:50]}"
    if "run_backup (" not in joined:
        if "_find_and_load" in joined or "<module>" in inner:
            return "start-up: Python imports"
        if "_open_jobs" in joined or "_open_archive" in joined or "Archive" in joined:
            return "start-up: open the archive"
        return "start-up: CLI, config, job record"
    return "other"


def pyspy_backup(data_dir: Path, target: Path, config: Path, out_dir: Path, name: str) -> dict:
    raw = out_dir / f"backup-cli-{name}.txt"
    cmd = [str(PYSPY), "record", "--format", "raw", "--idle", "--threads", "--rate", "500", "--nonblocking",
           "--output", str(raw), "--", *clinicbox_cmd("backup", "run", "--to", str(target), data_dir=data_dir,
                                                      config=config)]
    t0 = time.perf_counter()
    r = run(cmd, env=cli_env(), cwd=REPO)
    dt = time.perf_counter() - t0
    if r.returncode or not raw.exists():
        return {"error": f"py-spy exited {r.returncode}: {r.stderr.strip()[-400:]}"}
    backup_src = (REPO / "clinicbox" / "jobs" / "backup.py").read_text().splitlines()
    phases: Counter = Counter()
    per_thread: dict = defaultdict(Counter)
    idle = 0
    for line in raw.read_text().splitlines():
        stack_s, _, count = line.rpartition(" ")
        if not stack_s:
            continue
        frames = stack_s.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        phase = classify(frames, backup_src)
        if phase is None:
            idle += int(count)
            continue
        phases[phase] += int(count)
        per_thread[thread][phase] += int(count)
    total = sum(phases.values())
    return {"wall_s_under_pyspy": round(dt, 3), "busy_samples": total, "idle_samples": idle, "rate_hz": 500,
            "phases": {k: {"samples": v, "share": round(v / total, 3), "thread_s": round(v / 500, 3)}
                       for k, v in phases.most_common()},
            "threads": {t: dict(c.most_common(6)) for t, c in per_thread.items()}, "raw": str(raw)}


def files_of(objects: Path) -> list[Path]:
    return sorted(Path(dp) / f for dp, _d, fs in os.walk(objects) for f in fs)


def phases_inprocess(data_dir: Path, scratch: Path) -> dict:
    """Each part of the backup's work alone, single-threaded, on page-cached files."""
    files = files_of(data_dir / "objects")
    out: dict = {"files": len(files)}

    def timed(name, fn):
        sync()
        t0 = time.perf_counter()
        fn()
        out[name] = round(time.perf_counter() - t0, 3)

    def read_all():
        for p in files:
            with open(p, "rb") as fh:
                while fh.read(CHUNK):
                    pass

    def hash_all():
        for p in files:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                fh.seek(dataset_offset(fh))
                while chunk := fh.read(CHUNK):
                    h.update(chunk)

    def header_all():
        for p in files:
            with open(p, "rb") as fh:
                dataset_offset(fh)

    def copy_py(dest: Path):
        def go():
            for p in files:
                d = dest / p.relative_to(data_dir)
                d.parent.mkdir(parents=True, exist_ok=True)
                with open(p, "rb") as fin, open(d, "wb") as fout:
                    while chunk := fin.read(CHUNK):
                        fout.write(chunk)
        return go

    def copy_kernel(dest: Path):
        def go():
            for p in files:
                d = dest / p.relative_to(data_dir)
                d.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, d)  # Linux: sendfile / copy_file_range, no user-space buffer
        return go

    timed("read_s", read_all)
    timed("dataset_offset_s", header_all)
    timed("read_and_sha256_s", hash_all)
    d1 = scratch / "py"
    timed("copy_read_write_1MiB_s", copy_py(d1))
    t0 = time.perf_counter()
    sync()
    out["sync_after_copy_s"] = round(time.perf_counter() - t0, 3)
    rm(d1)
    d2 = scratch / "kernel"
    timed("copy_shutil_copyfile_s", copy_kernel(d2))
    rm(d2)
    snap = scratch / "snap.sqlite3"
    timed("snapshot_vacuum_into_s", lambda: _snapshot(data_dir / "index.sqlite3", snap))
    snap.unlink(missing_ok=True)
    sync()
    for workers in (1, 2, 4):
        tgt = scratch / f"w{workers}"
        tgt.mkdir()
        sync()
        out[f"run_backup_workers{workers}_s"] = round(inproc_backup(data_dir, tgt, workers)["s"], 3)
        rm(tgt)
    sync()
    return out


# ---------------------------------------------------------------------------------------------
# report

def stats(values: list[float]) -> dict:
    return {"n": len(values), "best": min(values), "median": statistics.median(values), "all": values}


def environment() -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except OSError:
            return ""
    return {"clinicbox_git": out(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
            "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "cp": out(["cp", "--version"]).splitlines()[0] if out(["cp", "--version"]) else "",
            "filesystem": out(["df", "-hT", tempfile.gettempdir()]).splitlines()[-1:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--per-study", type=int, default=100, help="instances per study (default 100)")
    ap.add_argument("--size", type=int, default=512,
                    help="rows = columns of each CT image (default 512: a CT slice as scanners write it, 0.5 MB; "
                         "256 gives the 132 kB objects of the runs before 2026-11-23 evening)")
    ap.add_argument("--new", type=int, default=100, help="instances imported before the incremental backup")
    ap.add_argument("--repeat", type=int, default=3, help="measurements of each variant (default 3)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/clinicbox-backup-bench"),
                    help="where the generated archive is kept between runs (default /tmp/clinicbox-backup-bench)")
    ap.add_argument("--rebuild", action="store_true", help="build again even if the cache matches")
    ap.add_argument("--profile", action="store_true", help="profile even if every target is met")
    ap.add_argument("--no-profile", action="store_true", help="never profile")
    ap.add_argument("--strict", action="store_true", help="exit 3 if a target is missed")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every timed variant (needs root): objects read from disk")
    args = ap.parse_args()
    if args.cold:
        if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
            ap.error("--cold needs root (writes /proc/sys/vm/drop_caches)")
        COLD["on"] = True

    main_pid = os.getpid()

    def on_signal(signum, _frame):
        if os.getpid() != main_pid:      # a build worker (Pool.terminate sends SIGTERM): just exit
            os._exit(0)
        stop_all_started()
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)

    started = datetime.now()
    key = {"gen": GEN_VERSION, "studies": args.studies, "per_study": args.per_study, "size": args.size,
           "new": args.new}
    args.cache.mkdir(parents=True, exist_ok=True)
    config = args.cache / "clinicbox.toml"
    config.write_text("# bench/backup.py: defaults\n")
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
    compile_program()
    env = environment()
    rows: dict[str, list[float]] = defaultdict(list)
    runs: list[dict] = []
    warnings: list[str] = []
    profile: dict = {}
    try:
        t0 = time.monotonic()
        info = build(args.cache, key, config, args.rebuild)
        build_s = round(time.monotonic() - t0, 1)
        base = args.cache / "base"
        print(f"archive: {info['objects']} instances, {info['objects_bytes'] / 1e6:.1f} MB "
              f"({info['objects_bytes'] / info['objects'] / 1e3:.0f} kB each); new: {info['new_files']} files, "
              f"{info['new_bytes'] / 1e6:.1f} MB; work folder {work}")

        variants = ["cp", "cp+sync", "cli", "inproc"]
        for i in range(args.repeat):
            d_cli, d_inp = work / f"data-cli-{i}", work / f"data-inp-{i}"
            fresh_copy(base, d_cli)
            fresh_copy(base, d_inp)
            t_cli, t_inp = work / f"target-cli-{i}", work / f"target-inp-{i}"
            t_cli.mkdir()
            t_inp.mkdir()
            nbytes, warm_s = warm(base)
            sync()
            share = busy_share()
            if share > 0.15:
                warnings.append(f"repeat {i + 1}: the machine was busy ({100 * share:.0f}% of a CPU) before it")
            order = variants[i % len(variants):] + variants[:i % len(variants)]
            rec: dict = {"repeat": i + 1, "order": order, "warm_read_s": round(warm_s, 3), "busy_before": share}
            for v in order:
                settle()
                if v in ("cp", "cp+sync"):
                    dest = work / f"cp-{i}"
                    s = cp_r(d_cli / "objects", dest, with_sync=(v == "cp+sync"))
                    rec[v] = {"s": s}
                    rm(dest)
                elif v == "cli":
                    rec["cli_full"] = cli_backup(d_cli, t_cli, config)
                    s = rec["cli_full"]["s"]
                else:
                    rec["inproc_full"] = inproc_backup(d_inp, t_inp)
                    s = rec["inproc_full"]["s"]
                rows[{"cli": "cli_full", "inproc": "inproc_full"}.get(v, v)].append(s)
                print(f"  repeat {i + 1}: {v:8s} {s:7.3f} s", flush=True)
            rec["import_new"] = [import_new(d_cli, args.cache / "new", config),
                                 import_new(d_inp, args.cache / "new", config)]
            warm(d_cli / "objects")
            for v in ("cli", "inproc") if i % 2 == 0 else ("inproc", "cli"):
                settle()
                if v == "cli":
                    r = rec["cli_incr"] = cli_backup(d_cli, t_cli, config)
                else:
                    r = rec["inproc_incr"] = inproc_backup(d_inp, t_inp)
                rows[f"{v}_incr"].append(r["s"])
                print(f"  repeat {i + 1}: {v + ' incr':12s} {r['s']:7.3f} s  (copied {r.get('copied')})", flush=True)
            for k, want in (("cli_full", info["objects"]), ("inproc_full", info["objects"]),
                            ("cli_incr", args.new), ("inproc_incr", args.new)):
                if rec[k].get("copied") != want:
                    warnings.append(f"repeat {i + 1}: {k} copied {rec[k].get('copied')}, expected {want}")
            if rec["cli_full"].get("run_backup_s") is not None:
                rows["cli_full_inner"].append(rec["cli_full"]["run_backup_s"])
                rows["cli_incr_inner"].append(rec["cli_incr"]["run_backup_s"])
            runs.append(rec)
            for p in (t_cli, t_inp, d_cli, d_inp):
                rm(p)
            sync()

        summ = {k: stats(v) for k, v in rows.items()}
        b = {k: v["best"] for k, v in summ.items()}
        m = {k: v["median"] for k, v in summ.items()}
        ratios = {
            "cli_full / cp+sync": (b["cli_full"] / b["cp+sync"], m["cli_full"] / m["cp+sync"]),
            "cli_full / cp": (b["cli_full"] / b["cp"], m["cli_full"] / m["cp"]),
            "inproc_full / cp+sync": (b["inproc_full"] / b["cp+sync"], m["inproc_full"] / m["cp+sync"]),
            "inproc_full / cp": (b["inproc_full"] / b["cp"], m["inproc_full"] / m["cp"]),
            "cli_incr / cli_full": (b["cli_incr"] / b["cli_full"], m["cli_incr"] / m["cli_full"]),
            "inproc_incr / inproc_full": (b["inproc_incr"] / b["inproc_full"], m["inproc_incr"] / m["inproc_full"]),
        }
        mb = info["objects_bytes"] / 1e6
        labels = {"cp": "cp -r objects", "cp+sync": "cp -r objects; sync",
                  "cli_full": "clinicbox backup run, full (CLI)", "inproc_full": "run_backup(), full (in-process)",
                  "cli_incr": f"clinicbox backup run, +{args.new} (CLI)",
                  "inproc_incr": f"run_backup(), +{args.new} (in-process)",
                  "cli_full_inner": "  of which run_backup (CLI's own figure)",
                  "cli_incr_inner": "  of which run_backup, incremental"}
        cache = ("page cache DROPPED before each variant (--cold: objects and index read from disk; the Python "
                 "program re-read, as the running service keeps it in memory)" if COLD["on"] else
                 "page cache warm (every object read first)")
        print(f"\n{info['objects']} instances, {mb:.0f} MB; {args.repeat} repeat(s); {cache}, sync before each "
              "variant\n")
        print(f"{'variant':44s} {'best s':>8s} {'median s':>9s} {'MB/s (best)':>12s}")
        for k in ("cp", "cp+sync", "cli_full", "cli_full_inner", "inproc_full", "cli_incr", "cli_incr_inner",
                  "inproc_incr"):
            if k in summ:
                rate = f"{mb / b[k]:12.0f}" if "incr" not in k else f"{'':12s}"
                print(f"{labels[k]:44s} {b[k]:8.3f} {m[k]:9.3f} {rate}")
        startup = {"full": m["cli_full"] - m["inproc_full"], "incr": m["cli_incr"] - m["inproc_incr"]}
        print(f"\nPython start-up + CLI + job record (CLI median - in-process median): full {startup['full']:.3f} s, "
              f"incremental {startup['incr']:.3f} s")
        print(f"\n{'ratio':30s} {'best':>7s} {'median':>7s}")
        for k, (rb, rm_) in ratios.items():
            print(f"{k:30s} {rb:7.2f} {rm_:7.2f}")
        verdicts = [
            (f"full backup (CLI) within {TARGET_VS_CP}x of cp -r + sync (best {ratios['cli_full / cp+sync'][0]:.2f}x, "
             f"median {ratios['cli_full / cp+sync'][1]:.2f}x)", ratios["cli_full / cp+sync"][1] <= TARGET_VS_CP),
            (f"full backup (CLI) within {TARGET_VS_CP}x of cp -r without sync (best {ratios['cli_full / cp'][0]:.2f}x, "
             f"median {ratios['cli_full / cp'][1]:.2f}x; not the fair one: cp leaves the data in the page cache)",
             ratios["cli_full / cp"][1] <= TARGET_VS_CP),
            (f"incremental backup (CLI) under {100 * TARGET_INCR_SHARE:.0f}% of the full one "
             f"(best {100 * ratios['cli_incr / cli_full'][0]:.1f}%, median {100 * ratios['cli_incr / cli_full'][1]:.1f}%)",
             ratios["cli_incr / cli_full"][1] < TARGET_INCR_SHARE),
            (f"incremental backup as the service runs it nightly (in-process, no Python start-up) under "
             f"{100 * TARGET_INCR_SHARE:.0f}% of the full one (best {100 * ratios['inproc_incr / inproc_full'][0]:.1f}%,"
             f" median {100 * ratios['inproc_incr / inproc_full'][1]:.1f}%)",
             ratios["inproc_incr / inproc_full"][1] < TARGET_INCR_SHARE),
        ]
        if warnings:
            print("\nwarnings:")
            for w in warnings:
                print("  " + w)
        print("\ntargets (on medians):")
        for text, ok in verdicts:
            print(f"  [{'met' if ok else 'MISSED'}] {text}")
        all_met = all(ok for _t, ok in verdicts)

        if not args.no_profile and (args.profile or not verdicts[0][1]):
            print("\nprofile: py-spy on one more CLI full backup, then the phases alone in-process ...", flush=True)
            prof_dir = RESULTS_DIR / f"backup-profile-{started:%Y%m%d-%H%M%S}"
            prof_dir.mkdir(parents=True, exist_ok=True)
            d = work / "data-prof"
            fresh_copy(base, d)
            warm(base)
            sync()
            if PYSPY.exists():
                tgt = work / "target-prof"
                tgt.mkdir()
                profile["pyspy"] = pyspy_backup(d, tgt, config, prof_dir, "full")
                import_new(d, args.cache / "new", config)
                warm(d / "objects")
                sync()
                profile["pyspy_incr"] = pyspy_backup(d, tgt, config, prof_dir, "incr")
                rm(tgt)
                sync()
            else:
                profile["pyspy"] = {"error": f"{PYSPY} missing"}
            rm(d)
            fresh_copy(base, d)
            profile["phases_inprocess"] = phases_inprocess(d, work)
            rm(d)
            for name in ("pyspy", "pyspy_incr"):
                p = profile.get(name, {})
                if "phases" in p:
                    what = "full" if name == "pyspy" else f"incremental (+{args.new})"
                    print(f"\npy-spy, CLI {what} backup ({p['wall_s_under_pyspy']:.2f} s under py-spy, "
                          f"{p['busy_samples']} busy samples at {p['rate_hz']} Hz over all threads; idle waits left out):")
                    for k, v in p["phases"].items():
                        print(f"  {k:44s} {v['thread_s']:7.3f} thread-s {100 * v['share']:5.1f}%")
                elif p:
                    print(f"py-spy: {p.get('error')}")
            ph = profile["phases_inprocess"]
            print(f"\nphases alone, in-process, one thread, {ph['files']} page-cached files:")
            for k, v in ph.items():
                if k != "files":
                    print(f"  {k:40s} {v:7.3f} s")

        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"backup-{started:%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps({
            "started": started.isoformat(timespec="seconds"), "args": {k: str(v) for k, v in vars(args).items()},
            "command": " ".join([".venv/bin/python", "bench/backup.py", *sys.argv[1:]]),
            "environment": env, "build": info, "build_or_reuse_s": build_s,
            "method": ("page cache dropped before each timed variant (--cold); " if COLD["on"] else
                       "page cache warm (every object read before each repeat); ") + "sync before each timed variant; "
                      "cp -r of the data dir's objects folder to a new folder on the same file system; "
                      "backups to empty targets (full) then, after clinicbox import of the new instances, "
                      "to the same target (incremental); default workers (2) and keep (14)",
            "runs": runs, "summary": summ, "ratios": {k: {"best": v[0], "median": v[1]} for k, v in ratios.items()},
            "startup_s": startup, "verdicts": [{"target": t, "met": ok} for t, ok in verdicts],
            "warnings": warnings, "profile": profile, "all_targets_met": all_met,
        }, indent=2))
        print(f"\nresults: {out.relative_to(REPO)}")
        print(f"all targets met: {'yes' if all_met else 'NO'}")
        return 3 if (args.strict and not all_met) else 0
    finally:
        stop_all_started()
        shutil.rmtree(work, ignore_errors=True)
        alive = [p.pid for p in _started if p.poll() is None]
        if alive:
            print(f"WARNING: processes still alive: {alive}")


if __name__ == "__main__":
    sys.exit(main())
