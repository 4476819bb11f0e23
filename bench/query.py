"""Query/retrieve benchmark: C-FIND latency and C-MOVE throughput, ClinicBox against Orthanc.

Run by hand from the repository root::

    .venv/bin/python bench/query.py [--studies 5000] [--per-study 20] [--queries 50] [--move-count 500]

What it does (see bench/README.md for more):

* generates ``--studies`` x ``--per-study`` small (8x8) synthetic instances (no patient data:
  names from syllable lists) with varied patients, names, dates (2019-2025), 1-4 series and four
  modalities; one study (its own patient) holds exactly ``--move-count`` instances;
* loads ClinicBox through its own import path (``clinicbox import``) and Orthanc through C-STORE
  (DCMTK ``storescu``), both into a cache folder (``--cache``) so the next run skips the build;
* starts ClinicBox (``clinicbox serve``, ``query.allow_from = "any"``, bind 127.0.0.1) and Orthanc
  (``TCP_NODELAY=1``) on free loopback ports, and from this one process, over ONE association per
  server (``--client raw``: message framing only, answers decoded after the clock stops; or
  ``--client pynetdicom``), sends the same ``--queries`` study-root C-FINDs of each kind to both (alternating):
  study level by PatientName wildcard, by StudyDate range and by PatientID, series level by
  StudyInstanceUID; latency = send until the final response; checks both give the same matches;
* starts DCMTK ``storescp +B`` (``TCP_NODELAY=1``) as AE STORESCP and C-MOVEs the
  ``--move-count`` study from each server into it (``--move-repeat`` times, folder cleared
  between runs), checking the number of files that arrived;
* prints a table, every ratio and the target verdicts, writes JSON to bench/results/;
  with ``--profile`` runs the query loop again against ClinicBox under py-spy and prints the
  hottest functions and the SQLite query plans.

Every process it starts is stopped by PID, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from datetime import date, datetime, timedelta
from multiprocessing import Pool
from pathlib import Path

from common import (_reset, _stage_done, _stage_mark, _started, pct, spawn, stop_all_started, stop_process,
                    tail, wait_port)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    from pydicom.dataset import Dataset
    from pydicom.uid import (ComputedRadiographyImageStorage, CTImageStorage, MRImageStorage,
                             UltrasoundImageStorage)
    from pynetdicom import AE
    from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                      StudyRootQueryRetrieveInformationModelMove)

    from tests.support.peers import ClinicBox, free_port
    from tests.support.synth import ORG_ROOT, ct_dataset
except ImportError as exc:  # pragma: no cover - wrong interpreter
    sys.exit(f"bench/query.py: {exc}; run it with the project venv: .venv/bin/python bench/query.py")

STORESCU = "/usr/bin/storescu"   # absolute: pynetdicom installs same-named scripts in the venv
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
PYSPY = REPO / ".venv" / "bin" / "py-spy"
RESULTS_DIR = REPO / "bench" / "results"
GEN_VERSION = 1            # bump when the generated data changes (invalidates the cache)
SEED = 20260101

TARGET_P95_MS = 50.0
TARGET_VS_ORTHANC = 5.0
TARGET_MOVE_VS_ORTHANC = 1.0

SCU_AET = "BENCHSCU"
DEST_AET = "STORESCP"

KINDS = ("name wildcard", "date range", "patient id", "series of study")



# ---------------------------------------------------------------------------------------------
# processes

# ---------------------------------------------------------------------------------------------
# synthetic archive

CONSONANTS = "BDFGHKLMNPRSTVWZ"
VOWELS = "AEIOU"
SUFFIXES = ["SON", "TER", "LEY", "MAN", "DEN", "RIS", "WELL", "TON", "ER", "OW", "INGS", "BERG"]
GIVEN_A = ["AN", "BE", "CA", "DA", "EL", "FI", "GE", "HA", "IS", "JO", "KA", "LU", "MA", "NO", "OL", "PE"]
GIVEN_B = ["NA", "RT", "LA", "VID", "SA", "NN", "ORG", "RRY", "LE", "E", "TE", "KE", "X", "AH", "IVER", "TER"]
MODALITIES = {"CT": CTImageStorage, "MR": MRImageStorage, "CR": ComputedRadiographyImageStorage,
              "US": UltrasoundImageStorage}
DATE0, DATE1 = date(2019, 1, 1), date(2025, 12, 31)


def prefixes(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct consonant-vowel-consonant family-name prefixes, "SMI" among them."""
    out = {"SMI"}
    while len(out) < n:
        out.add(rng.choice(CONSONANTS) + rng.choice(VOWELS) + rng.choice(CONSONANTS))
    return sorted(out)


def plan_archive(studies: int, per_study: int, move_count: int) -> dict:
    """The whole archive as a plain description (deterministic for given sizes)."""
    rng = random.Random(SEED)
    total = studies * per_study
    if studies < 2 or move_count >= total:
        raise SystemExit("need at least 2 studies and more instances than --move-count")
    # ~ one family-name prefix per 50 studies, so "PFX*" matches a few dozen studies
    pfx = prefixes(max(4, studies // 50), rng)
    n_patients = max(2, studies * 7 // 10)    # some patients have several studies
    patients = []
    for p in range(n_patients):
        family = rng.choice(pfx) + rng.choice(SUFFIXES)
        given = rng.choice(GIVEN_A) + rng.choice(GIVEN_B)
        patients.append({"id": f"PID{p + 1:06d}", "name": f"{family}^{given}",
                         "birth": f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                         "sex": rng.choice("MFO")})
    days = (DATE1 - DATE0).days
    remaining = total - move_count
    normal = studies - 1
    out_studies = []
    # the move study: its own patient, one CT series of exactly move_count instances
    move_patient = {"id": "PIDMOVE01", "name": "MOVEBENCH^ONLY", "birth": "19700101", "sex": "O"}
    for s in range(studies):
        uid = f"{ORG_ROOT}77.{s + 1}"
        if s == 0:
            sizes, mods, pat = [move_count], ["CT"], move_patient
        else:
            k = s - 1
            n = remaining // normal + (1 if k < remaining % normal else 0)
            n_series = min(n, rng.randint(1, 4))
            cuts = sorted(rng.sample(range(1, n), n_series - 1)) if n_series > 1 else []
            sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
            mods = [rng.choice(list(MODALITIES)) for _ in sizes]
            pat = patients[rng.randrange(n_patients)]
        d = DATE0 + timedelta(days=rng.randint(0, days))
        out_studies.append({
            "uid": uid, "patient": pat, "date": d.strftime("%Y%m%d"),
            "time": f"{rng.randint(7, 18):02d}{rng.randint(0, 59):02d}00",
            "accession": f"ACC{s + 1:07d}", "description": f"Synthetic {mods[0]} study",
            "series": [{"uid": f"{uid}.{j + 1}", "modality": m, "count": c} for j, (m, c) in enumerate(zip(mods, sizes))],
        })
    return {"studies": out_studies, "prefixes": pfx, "total": total, "move_study": out_studies[0]["uid"]}


def _write_study(args) -> int:
    folder, study = args
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pat = study["patient"]
    n = 0
    for j, series in enumerate(study["series"]):
        for i in range(1, series["count"] + 1):
            ds = ct_dataset(study["uid"], series["uid"], i, rows=8, cols=8, patient_id=pat["id"],
                            patient_name=pat["name"], seed=i)
            sop_class = MODALITIES[series["modality"]]
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series['uid']}.{i}"
            ds.Modality = series["modality"]
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = study["date"]
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = study["time"]
            ds.AccessionNumber = study["accession"]
            ds.StudyDescription = study["description"]
            ds.SeriesDescription = f"{series['modality']} series {j + 1}"
            ds.SeriesNumber = j + 1
            ds.PatientBirthDate = pat["birth"]
            ds.PatientSex = pat["sex"]
            ds.save_as(folder / f"{j + 1}-{i:04d}.dcm", enforce_file_format=True)
            n += 1
    return n


def write_files(plan: dict, root: Path) -> int:
    """Studies alternate between root/part0 and root/part1 (two loaders run in parallel)."""
    jobs = [(str(root / f"part{s % 2}" / f"s{s + 1:05d}"), st) for s, st in enumerate(plan["studies"])]
    with Pool(os.cpu_count() or 2) as pool:
        return sum(pool.imap_unordered(_write_study, jobs, chunksize=20))


# ---------------------------------------------------------------------------------------------
# servers

def clinicbox_config(work: Path) -> Path:
    path = work / "clinicbox.toml"
    path.write_text('[server]\nbind = "127.0.0.1"\n\n[query]\nallow_from = "any"\n')
    return path


def clinicbox_cli(*args: str, data_dir: Path, config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CLINICBOX_CONFIG"}
    return subprocess.run([sys.executable, "-m", "clinicbox", *args, "--data-dir", str(data_dir),
                           "--config", str(config)], capture_output=True, text=True, env=env, cwd=REPO)


class OrthancServer:
    def __init__(self, folder: Path, modalities: dict, build: bool = False) -> None:
        self.folder = folder
        self.modalities = modalities
        self.build = build
        self.port = free_port()
        self.http_port = free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "query-bench", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "DicomAet": "ORTHANC", "DicomPort": self.port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": self.modalities, "Plugins": [],
        }
        if self.build:
            # only while loading: no fdatasync per file (the measured runs use the defaults)
            config["SyncStorageArea"] = False
        path = self.folder / ("orthanc-build.json" if self.build else "orthanc.json")
        path.write_text(json.dumps(config, indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = spawn([ORTHANC, str(path)], self.folder / "orthanc.log", env=env, cwd=self.folder)
        wait_port(self.http_port, self.proc, "Orthanc (HTTP)", timeout=300)
        wait_port(self.port, self.proc, "Orthanc", timeout=60)

    def rest(self, path: str):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.http_port}{path}", timeout=120) as resp:
            return json.load(resp)

    def stop(self) -> None:
        stop_process(self.proc)


# ---------------------------------------------------------------------------------------------
# build (cached)

def build(cache: Path, plan: dict, key: dict) -> dict:
    """Generate the files and load both servers; each stage is skipped when the cache holds it."""
    cache.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    n = plan["total"]
    parts = [cache / "files" / "part0", cache / "files" / "part1"]

    done = _stage_done(cache, "files", key)
    if done:
        print(f"reusing the generated files in {cache / 'files'}")
    else:
        _reset(cache, "files", "files.done.json", "clinicbox", "clinicbox.done.json", "orthanc", "orthanc.done.json")
        t0 = time.perf_counter()
        written = write_files(plan, cache / "files")
        done = {"generate_s": time.perf_counter() - t0, "instances": written}
        print(f"generated {written} instances in {done['generate_s']:.0f} s", flush=True)
        _stage_mark(cache, "files", key, done)
    info["generate_s"] = done["generate_s"]

    # ClinicBox: its own import path, two `clinicbox import` processes (one per half) at once
    cb_dir = cache / "clinicbox"
    done = _stage_done(cache, "clinicbox", key)
    if done:
        print(f"reusing ClinicBox's data dir {cb_dir / 'data'} (imported {done['built']})")
    else:
        _reset(cache, "clinicbox", "clinicbox.done.json")
        cb_dir.mkdir()
        config = clinicbox_config(cb_dir)
        t0 = time.perf_counter()
        # Create the index first: two imports starting together on a new data dir race in the
        # schema migration ("table patients already exists"; reported, see bench/README.md).
        r = clinicbox_cli("studies", "--json", data_dir=cb_dir / "data", config=config)
        if r.returncode:
            raise RuntimeError(f"clinicbox studies (index creation) failed: {r.stderr}")
        env = {k: v for k, v in os.environ.items() if k != "CLINICBOX_CONFIG"}
        procs = [spawn([sys.executable, "-m", "clinicbox", "import", str(p), "--quiet", "--data-dir",
                        str(cb_dir / "data"), "--config", str(config)], cb_dir / f"import-{p.name}.log",
                       env=env, cwd=REPO) for p in parts]
        rcs = [p.wait() for p in procs]
        secs = time.perf_counter() - t0
        if any(rcs):
            raise RuntimeError(f"clinicbox import exited {rcs}:\n{tail(cb_dir / 'import-part0.log')}\n"
                               f"{tail(cb_dir / 'import-part1.log')}")
        studies = json.loads(clinicbox_cli("studies", "--json", data_dir=cb_dir / "data", config=config).stdout)
        cb_count = sum(int(s["num_instances"]) for s in studies)
        print(f"ClinicBox: `clinicbox import` (2 processes) of {n} files in {secs:.0f} s "
              f"({n / secs:.0f}/s): {len(studies)} studies, {cb_count} instances", flush=True)
        if cb_count != n or len(studies) != len(plan["studies"]):
            raise RuntimeError(f"ClinicBox holds {len(studies)} studies / {cb_count} instances, expected "
                               f"{len(plan['studies'])} / {n}")
        done = {"import_s": secs, "built": datetime.now().isoformat(timespec="seconds")}
        _stage_mark(cache, "clinicbox", key, done)
    info["clinicbox_import_s"] = done["import_s"]

    # Orthanc: C-STORE with DCMTK storescu, two associations at once, no fdatasync while loading
    done = _stage_done(cache, "orthanc", key)
    if done:
        print(f"reusing Orthanc's storage in {cache / 'orthanc'} (loaded {done['built']})")
    else:
        _reset(cache, "orthanc", "orthanc.done.json")
        orthanc = OrthancServer(cache / "orthanc", {}, build=True)
        try:
            orthanc.start()
            t0 = time.perf_counter()
            senv = {**os.environ, "TCP_NODELAY": "1"}
            procs = [spawn([STORESCU, "+sd", "+r", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.port), str(p)],
                           cache / "orthanc" / f"storescu-{p.name}.log", env=senv) for p in parts]
            rcs = [p.wait() for p in procs]
            secs = time.perf_counter() - t0
            stats = orthanc.rest("/statistics")
        finally:
            orthanc.stop()
        print(f"Orthanc: storescu (2 associations) of {n} files in {secs:.0f} s "
              f"({n / secs:.0f}/s): {stats['CountStudies']} studies, {stats['CountInstances']} instances", flush=True)
        if any(rcs) or int(stats["CountInstances"]) != n:
            raise RuntimeError(f"storescu exited {rcs}; Orthanc holds {stats['CountInstances']} instances, expected {n}")
        done = {"store_s": secs, "built": datetime.now().isoformat(timespec="seconds")}
        _stage_mark(cache, "orthanc", key, done)
    info["orthanc_store_s"] = done["store_s"]
    info["instances"] = n
    return info


# ---------------------------------------------------------------------------------------------
# queries

STUDY_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
              "AccessionNumber", "StudyDescription", "ReferringPhysicianName", "StudyID", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "StudyInstanceUID"]
SERIES_KEYS = ["Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "NumberOfSeriesRelatedInstances",
               "SeriesInstanceUID"]


def identifier(kind: str, value: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if kind == "series of study" else "STUDY"
    for kw in (SERIES_KEYS if kind == "series of study" else STUDY_KEYS):
        setattr(ds, kw, "")
    if kind == "name wildcard":
        ds.PatientName = value
    elif kind == "date range":
        ds.StudyDate = value
    elif kind == "patient id":
        ds.PatientID = value
    else:
        ds.StudyInstanceUID = value
    return ds


def make_queries(plan: dict, n: int) -> dict[str, list[str]]:
    rng = random.Random(SEED + 1)
    normal = plan["studies"][1:]
    pfx = list(plan["prefixes"])
    rng.shuffle(pfx)
    names = [f"{p}*" for p in (pfx * (n // len(pfx) + 1))[:n]]
    dates = []
    for _ in range(n):
        d0 = DATE0 + timedelta(days=rng.randint(0, (DATE1 - DATE0).days - 14))
        dates.append(f"{d0:%Y%m%d}-{d0 + timedelta(days=13):%Y%m%d}")
    pids = [rng.choice(normal)["patient"]["id"] for _ in range(n)]
    studies = [rng.choice(normal)["uid"] for _ in range(n)]
    return {"name wildcard": names, "date range": dates, "patient id": pids, "series of study": studies}


def expected_matches(plan: dict, kind: str, value: str) -> int:
    if kind == "series of study":
        return sum(len(s["series"]) for s in plan["studies"] if s["uid"] == value)
    if kind == "name wildcard":
        return sum(1 for s in plan["studies"] if s["patient"]["name"].startswith(value.rstrip("*")))
    if kind == "date range":
        lo, hi = value.split("-")
        return sum(1 for s in plan["studies"] if lo <= s["date"] <= hi)
    return sum(1 for s in plan["studies"] if s["patient"]["id"] == value)


def nodelay(assoc) -> None:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(port: int, aet: str):
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise RuntimeError(f"association with {aet} on port {port} not established")
    nodelay(assoc)
    return assoc


class RawFind:
    """A C-FIND SCU that only frames messages (clinicbox.dicom.scu.Scu) and decodes the answers after
    the clock stops: what is measured is the server, not a Python client decoding every answer."""

    def __init__(self, port: int, aet: str) -> None:
        from clinicbox.dicom.scu import Scu

        self.scu = Scu("127.0.0.1", port, SCU_AET, aet, timeout=300)
        self.scu.associate([(str(StudyRootQueryRetrieveInformationModelFind),
                             ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])])
        if not self.scu.accepted:
            raise RuntimeError(f"{aet} accepted no C-FIND context")
        self.cx = self.scu.accepted[0]
        self.implicit = self.cx.transfer_syntax == "1.2.840.10008.1.2"
        self.msg_id = 0

    def find(self, ds: Dataset) -> tuple[float, list[Dataset], int]:
        from io import BytesIO

        from pynetdicom.dsutils import decode, encode

        from clinicbox.dicom.scu import command_value, find_command

        data = encode(ds, self.implicit, True)
        self.msg_id = self.msg_id % 65535 + 1
        command = find_command(str(StudyRootQueryRetrieveInformationModelFind), self.msg_id)
        raw = []
        t0 = time.perf_counter()
        self.scu.send_message(self.cx.context_id, command, data)
        while True:
            cmd, body = self.scu.read_message()
            status = command_value(cmd, 0x0900)
            if status in (0xFF00, 0xFF01):
                raw.append(body)
                continue
            break
        dt = time.perf_counter() - t0
        return dt, [decode(BytesIO(b), self.implicit, True) for b in raw], status

    def release(self) -> None:
        self.scu.release()


def findscu_repeat(port: int, called: str, ds: Dataset, n: int, work: Path) -> list[tuple[float, int]]:
    """DCMTK ``findscu -S --repeat n`` with ``ds`` on ONE association: (seconds from "Sending Find Request"
    to "Received Final Find Response" by findscu's own time stamps, answers) per query, the first dropped."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    import re

    from worklist import FINAL_RSP, TIMED_LOG_CFG, _stamped

    pending = re.compile(r"Find Response:? \d+ \(Pending")  # findscu -S logs "Find Response: 1 (Pending)"

    cfg = work / "findscu-timestamps.cfg"
    cfg.write_text(TIMED_LOG_CFG)
    query = work / f"query-{called}.dcm"
    ds = Dataset(ds)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(query, enforce_file_format=True)
    r = subprocess.run(["/usr/bin/findscu", "-S", "-lc", str(cfg), "--repeat", str(n + 1), "-aet", SCU_AET,
                        "-aec", called, "127.0.0.1", str(port), str(query)], capture_output=True, text=True,
                       errors="replace", env={**os.environ, "TCP_NODELAY": "1"}, check=False)
    out, t_send, answers = [], None, 0
    for t, text in _stamped(r.stdout + r.stderr):
        if text.startswith("Sending Find Request"):
            t_send, answers = t, 0
        elif pending.search(text):
            answers += 1
        elif t_send is not None and FINAL_RSP.search(text):
            out.append((t - t_send, answers))
            t_send = None
    if r.returncode or len(out) != n + 1:
        raise RuntimeError(f"findscu --repeat -aec {called}: exit {r.returncode}, {len(out)} timed: "
                           f"{(r.stdout + r.stderr)[-600:]}")
    return out[1:]


def c_find(assoc, ds: Dataset) -> tuple[float, list[Dataset], int]:
    if isinstance(assoc, RawFind):
        return assoc.find(ds)
    answers = []
    status_final = None
    t0 = time.perf_counter()
    for status, ident in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
        if status is None:
            raise RuntimeError("C-FIND: no response (association aborted or timed out)")
        if status.Status in (0xFF00, 0xFF01):
            answers.append(ident)
        else:
            status_final = status.Status
    dt = time.perf_counter() - t0
    return dt, answers, status_final


def uid_of(kind: str, ds: Dataset) -> str:
    return str(ds.get("SeriesInstanceUID" if kind == "series of study" else "StudyInstanceUID", ""))


def run_queries(assocs: dict, queries: dict, plan: dict, warmup: int) -> tuple[dict, list[str]]:
    """Alternate the same query between the servers; return per server and kind the latencies."""
    results = {name: {k: {"ms": [], "answers": []} for k in KINDS} for name in assocs}
    warnings = []
    for kind in KINDS:
        for v in queries[kind][:warmup]:   # untimed warm-up of each kind on each server
            for assoc in assocs.values():
                c_find(assoc, identifier(kind, v))
    for kind in KINDS:
        for v in queries[kind]:
            got = {}
            for name, assoc in assocs.items():
                dt, answers, status = c_find(assoc, identifier(kind, v))
                if status != 0:
                    warnings.append(f"{name} {kind} {v!r}: final status 0x{status:04X}")
                results[name][kind]["ms"].append(dt * 1000)
                results[name][kind]["answers"].append(len(answers))
                got[name] = {uid_of(kind, a) for a in answers}
            exp = expected_matches(plan, kind, v)
            sets = list(got.values())
            if any(s != sets[0] for s in sets) or len(sets[0]) != exp:
                names = list(got)
                a, b = got[names[0]], got[names[-1]]
                diff = next(iter((a - b) or (b - a)), None)
                warnings.append(f"{kind} {v!r}: " + ", ".join(f"{n} {len(s)}" for n, s in got.items())
                                + f", expected {exp}" + (f"; e.g. {diff} in only one" if diff else ""))
    return results, warnings


# ---------------------------------------------------------------------------------------------
# C-MOVE

def c_move(assoc, study_uid: str) -> tuple[float, Dataset | None]:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    last = None
    t0 = time.perf_counter()
    for status, _ident in assoc.send_c_move(ds, DEST_AET, StudyRootQueryRetrieveInformationModelMove):
        if status is None:
            raise RuntimeError("C-MOVE: no response (association aborted or timed out)")
        last = status
    return time.perf_counter() - t0, last


def count_files(folder: Path) -> int:
    return sum(len(f) for _r, _d, f in os.walk(folder))


def clear(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ---------------------------------------------------------------------------------------------
# profile (ClinicBox only)

def profile_queries(cb_pid: int, assoc, queries: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "clinicbox-query.collapsed"
    rec = subprocess.Popen([str(PYSPY), "record", "--pid", str(cb_pid), "--format", "raw", "--rate", "250",
                            "--output", str(raw), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _started.append(rec)
    time.sleep(1.0)
    t0 = time.perf_counter()
    for kind in KINDS:
        for v in queries[kind]:
            c_find(assoc, identifier(kind, v))
    busy = time.perf_counter() - t0
    rec.send_signal(signal.SIGINT)
    try:
        rec.wait(30)
    except subprocess.TimeoutExpired:
        stop_process(rec)
    if not raw.exists():
        return {"error": (rec.stderr.read() if rec.stderr else "")[-500:]}
    self_counts, incl_counts, total = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        if any(w in stack for w in ("select (", "wait (", "_wait_for_tstate_lock", "accept (")) \
                and not any("query.py" in f or "find.py" in f for f in frames):
            continue   # idle threads
        n = int(n)
        total += n
        self_counts[frames[-1]] += n
        for f in set(frames[1:]):
            incl_counts[f] += n
        _ = thread
    return {"collapsed": str(raw), "busy_s": busy, "samples": total,
            "top_self": self_counts.most_common(15), "top_inclusive": incl_counts.most_common(25)}


def query_plans(index_path: Path, queries: dict) -> dict:
    """The SQL ClinicBox runs for one query of each kind, and SQLite's plan for it."""
    from clinicbox.archive.index import Index
    from clinicbox.archive.query import QueryOptions, find, requested_keywords
    index = Index(index_path)
    out = {}
    for kind in KINDS:
        ident = identifier(kind, queries[kind][0])
        values = {e.keyword: str(e.value) if e.value is not None else "" for e in ident
                  if e.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet")}
        traced: list[str] = []
        index.conn.set_trace_callback(traced.append)
        t0 = time.perf_counter()
        n = sum(1 for _ in find(index, "STUDY", str(ident.QueryRetrieveLevel), values,
                                requested_keywords(ident), QueryOptions()))
        in_process_ms = (time.perf_counter() - t0) * 1000
        index.conn.set_trace_callback(None)
        main_sql = next((s for s in traced if s.lstrip().upper().startswith("SELECT") and " LIMIT " in s), "")
        plan = []
        if main_sql:
            plan = [" ".join(str(c) for c in r[1:]) for r in index.conn.execute("EXPLAIN QUERY PLAN " + main_sql)]
        out[kind] = {"value": queries[kind][0], "answers": n, "in_process_ms": in_process_ms,
                     "statements": len(traced), "sql": main_sql, "plan": plan}
    return out


# ---------------------------------------------------------------------------------------------
# report

def summarize(results: dict) -> dict:
    out = {}
    for name, kinds in results.items():
        out[name] = {}
        for kind, r in kinds.items():
            ms = r["ms"]
            out[name][kind] = {"n": len(ms), "p50_ms": pct(ms, 0.5), "p95_ms": pct(ms, 0.95), "max_ms": max(ms),
                               "mean_answers": statistics.mean(r["answers"]), "min_answers": min(r["answers"]),
                               "max_answers": max(r["answers"])}
    return out


def environment() -> dict:
    import pynetdicom
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        except OSError:
            return ""
    git = out(["git", "-C", str(REPO), "describe", "--always", "--dirty"]).strip()
    orthanc_v = next((l for l in out([ORTHANC, "--version"]).splitlines() if l.strip()), "Orthanc ?")
    return {"clinicbox_git": git, "pynetdicom": pynetdicom.__version__, "orthanc": orthanc_v.strip(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=5000)
    ap.add_argument("--per-study", type=int, default=20, help="instances per study on average (default 20)")
    ap.add_argument("--queries", type=int, default=50, help="timed queries per kind (default 50)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed queries per kind and server first")
    ap.add_argument("--move-count", type=int, default=500, help="instances of the study moved (default 500)")
    ap.add_argument("--move-repeat", type=int, default=3, help="C-MOVEs per server (default 3)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/clinicbox-query-bench"),
                    help="folder keeping the generated files and both servers' data between runs")
    ap.add_argument("--data", type=Path, default=None, help="alias of --cache (reuse a built archive)")
    ap.add_argument("--rebuild", action="store_true", help="build again even if the cache matches")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (logs, storescp output)")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards run the query loop again under py-spy (ClinicBox) and print SQL plans")
    ap.add_argument("--client", choices=("raw", "pynetdicom"), default="raw",
                    help="C-FIND client: raw (frames messages only, decodes after the clock stops: measures the "
                         "servers) or pynetdicom (its SCU, ~1 ms of client work per answer on both sides)")
    ap.add_argument("--client-tuning", action="store_true",
                    help="apply clinicbox.dicom.tuning.install() to this process's pynetdicom client too "
                         "(event waits instead of 1 ms polling: lowers the client floor for both servers)")
    ap.add_argument("--strict", action="store_true", help="exit 3 if a target is missed")
    args = ap.parse_args()
    cache = (args.data or args.cache).resolve()
    started = datetime.now()
    env = environment()
    print(f"ClinicBox query/retrieve benchmark ({env['clinicbox_git']}; pynetdicom {env['pynetdicom']} client, "
          f"{env['orthanc']}; {env['cpus']} CPUs)")

    client = "stock pynetdicom" if args.client == "pynetdicom" else "raw (clinicbox.dicom.scu.Scu framing only)"
    if args.client_tuning:
        from clinicbox.dicom import tuning
        tuning.install()
        client = "pynetdicom with clinicbox.dicom.tuning installed"
    print(f"query client: {client}, one association per server")
    plan = plan_archive(args.studies, args.per_study, args.move_count)
    key = {"gen": GEN_VERSION, "studies": args.studies, "per_study": args.per_study, "move_count": args.move_count}
    if args.rebuild:
        _reset(cache, "files.done.json", "clinicbox.done.json", "orthanc.done.json")
    n_patients = len({s["patient"]["id"] for s in plan["studies"]})
    print(f"archive: {plan['total']} instances in {len(plan['studies'])} studies, {n_patients} patients, "
          f"{sum(len(s['series']) for s in plan['studies'])} series; move study: {args.move_count} instances")

    work = Path(tempfile.mkdtemp(prefix="clinicbox-query-run-"))
    cb = orthanc = scp = None
    warnings: list[str] = []
    moves: dict[str, list[dict]] = {"ClinicBox": [], "Orthanc": []}
    profile = plans = None
    dcmtk_rows: dict = {}
    try:
        t_build = time.perf_counter()
        info = build(cache, plan, key)
        build_s = time.perf_counter() - t_build

        # destination first (its port goes into both servers' device tables)
        scp_port = free_port()
        scp_out = work / "storescp-out"
        scp_out.mkdir()
        scp = spawn([STORESCP, "-aet", DEST_AET, "+B", "-od", str(scp_out), str(scp_port)], work / "storescp.log",
                    env={**os.environ, "TCP_NODELAY": "1"})
        wait_port(scp_port, scp, "storescp")

        cb_data = cache / "clinicbox" / "data"
        config = clinicbox_config(work)
        r = clinicbox_cli("devices", "add", "BENCH-DEST", "--ae", DEST_AET, "--host", "127.0.0.1",
                          "--port", str(scp_port), "--role", "workstation", data_dir=cb_data, config=config)
        if r.returncode:
            raise RuntimeError(f"clinicbox devices add failed: {r.stderr or r.stdout}")
        box = ClinicBox(cb_data, free_port(), ae_title="CLINICBOX", config=config)
        box.log_path = work / "clinicbox-serve.log"
        try:
            box.start(timeout=300)
        finally:
            if box.proc is not None:
                _started.append(box.proc)
        cb = box
        orthanc = OrthancServer(cache / "orthanc", {
            DEST_AET: [DEST_AET, "127.0.0.1", scp_port], SCU_AET: [SCU_AET, "127.0.0.1", 1]})
        orthanc.start()
        stats = orthanc.rest("/statistics")
        print(f"servers up: ClinicBox pid {box.proc.pid} port {box.port}, Orthanc pid {orthanc.proc.pid} port "
              f"{orthanc.port} ({stats['CountStudies']} studies, {stats['CountInstances']} instances), "
              f"storescp pid {scp.pid} port {scp_port}")

        # pynetdicom associations poll with 1 ms sleeps in this process: with the raw client they are
        # opened only for the moves, after the queries, so their threads do not slow the client
        assocs = {} if args.client == "raw" else {
            "ClinicBox": associate(box.port, "CLINICBOX"), "Orthanc": associate(orthanc.port, "ORTHANC")}
        finders = assocs if args.client == "pynetdicom" else {
            "ClinicBox": RawFind(box.port, "CLINICBOX"), "Orthanc": RawFind(orthanc.port, "ORTHANC")}
        queries = make_queries(plan, args.queries)
        t0 = time.perf_counter()
        results, qwarn = run_queries(finders, queries, plan, args.warmup)
        # an independent client as a check: DCMTK findscu --repeat, one query per kind, its own time stamps
        dcmtk_rows = {}
        for kind in KINDS:
            ds = identifier(kind, queries[kind][0])
            got = {name: findscu_repeat(port, aet, ds, 20, work)
                   for name, port, aet in (("ClinicBox", box.port, "CLINICBOX"), ("Orthanc", orthanc.port, "ORTHANC"))}
            dcmtk_rows[kind] = {name: {"p50_ms": 1000 * pct([t for t, _a in v], 0.5),
                                       "p95_ms": 1000 * pct([t for t, _a in v], 0.95),
                                       "answers": v[0][1]} for name, v in got.items()}
        if not assocs:
            assocs = {"ClinicBox": associate(box.port, "CLINICBOX"), "Orthanc": associate(orthanc.port, "ORTHANC")}
        warnings += qwarn
        print(f"queries: {args.queries} per kind and server, one association each, alternating servers "
              f"({time.perf_counter() - t0:.0f} s)")

        for rep in range(args.move_repeat):
            for name, assoc in assocs.items():
                clear(scp_out)
                dt, status = c_move(assoc, plan["move_study"])
                time.sleep(0.2)
                got = count_files(scp_out)
                st = f"0x{status.Status:04X}" if status is not None else "none"
                m = {"seconds": dt, "files": got, "status": st,
                     "completed": int(status.get("NumberOfCompletedSuboperations", 0) or 0) if status else 0,
                     "failed": int(status.get("NumberOfFailedSuboperations", 0) or 0) if status else 0}
                m["ok"] = got == args.move_count and st == "0x0000"
                moves[name].append(m)
                if not m["ok"]:
                    warnings.append(f"C-MOVE from {name}: status {st}, {got} files arrived, expected {args.move_count}")
                print(f"  C-MOVE {rep + 1} from {name}: {dt:.2f} s, {got / dt:.0f} instances/s, "
                      f"{got} files, status {st}")

        if args.profile:
            print("profiling ClinicBox during a second (untimed) query loop ...", flush=True)
            prof_dir = RESULTS_DIR / f"query-profile-{started:%Y%m%d-%H%M%S}"
            profile = profile_queries(box.proc.pid, finders["ClinicBox"], queries, prof_dir)
        for assoc in assocs.values():
            assoc.release()
        if finders is not assocs:
            for finder in finders.values():
                finder.release()
        if args.profile:
            plans = query_plans(cb_data / "index.sqlite3", queries)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping servers", file=sys.stderr)
        return 130
    except Exception:
        if cb is not None:
            print("ClinicBox log tail:\n" + tail(cb.log_path), file=sys.stderr)
        if orthanc is not None:
            print("Orthanc log tail:\n" + tail(orthanc.folder / "orthanc.log"), file=sys.stderr)
        raise
    finally:
        if cb is not None:
            cb.stop()
        if orthanc is not None:
            orthanc.stop()
        stop_process(scp)
        stop_all_started()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"run folder kept: {work}")
    alive = [p.pid for p in _started if p.poll() is None]

    # ------------------------------------------------------------------ report
    summ = summarize(results)
    print()
    print(f"{'query (study root)':<26}{'answers':>9} | {'ClinicBox p50':>13}{'p95':>8}{'max':>8} | "
          f"{'Orthanc p50':>11}{'p95':>8}{'max':>8} | {'p50 ×':>7}{'p95 ×':>7}")
    verdicts = []
    ratios = {}
    for kind in KINDS:
        c, o = summ["ClinicBox"][kind], summ["Orthanc"][kind]
        r50, r95 = o["p50_ms"] / c["p50_ms"], o["p95_ms"] / c["p95_ms"]
        ratios[kind] = {"p50": r50, "p95": r95}
        label = kind + (" (SERIES)" if kind == "series of study" else " (STUDY)")
        print(f"{label:<26}{c['mean_answers']:>9.1f} | {c['p50_ms']:>10.1f} ms{c['p95_ms']:>8.1f}{c['max_ms']:>8.1f} | "
              f"{o['p50_ms']:>8.1f} ms{o['p95_ms']:>8.1f}{o['max_ms']:>8.1f} | {r50:>6.1f}×{r95:>6.1f}×")
        verdicts.append((f"{kind}: ClinicBox p95 {c['p95_ms']:.1f} ms < {TARGET_P95_MS:.0f} ms",
                         c["p95_ms"] < TARGET_P95_MS))
        verdicts.append((f"{kind}: ClinicBox {r95:.1f}× faster than Orthanc at p95 (p50 {r50:.1f}×), "
                         f"target ≥ {TARGET_VS_ORTHANC:.0f}×", r95 >= TARGET_VS_ORTHANC))
    print("(answers = mean matches per query; ratio = Orthanc latency / ClinicBox latency, > 1 means ClinicBox is faster)")
    print("\nthe same check with DCMTK findscu --repeat (one association, 20 timed queries of the first value of "
          "each kind, findscu's own time stamps):")
    for kind, row in dcmtk_rows.items():
        c, o = row["ClinicBox"], row["Orthanc"]
        print(f"  {kind:<24}{c['answers']:>4} answers | ClinicBox {c['p50_ms']:6.1f} / {c['p95_ms']:6.1f} ms | "
              f"Orthanc {o['p50_ms']:6.1f} / {o['p95_ms']:6.1f} ms | p95 {o['p95_ms'] / c['p95_ms']:5.1f}×")

    move_summary = {}
    for name, runs in moves.items():
        good = [m for m in runs if m["ok"]]
        if good:
            best = min(m["seconds"] for m in good)
            med = statistics.median(m["seconds"] for m in good)
            move_summary[name] = {"best_s": best, "median_s": med, "best_rate": args.move_count / best,
                                  "median_rate": args.move_count / med, "runs": len(runs), "ok_runs": len(good)}
    print()
    print(f"C-MOVE of the {args.move_count}-instance study into DCMTK storescp +B (TCP_NODELAY=1), "
          f"{args.move_repeat} runs each:")
    for name, s in move_summary.items():
        print(f"  {name:<10} best {s['best_s']:.2f} s = {s['best_rate']:.0f} instances/s, "
              f"median {s['median_s']:.2f} s = {s['median_rate']:.0f} instances/s ({s['ok_runs']}/{s['runs']} runs ok)")
    if len(move_summary) == 2:
        mr = move_summary["ClinicBox"]["best_rate"] / move_summary["Orthanc"]["best_rate"]
        mr_med = move_summary["ClinicBox"]["median_rate"] / move_summary["Orthanc"]["median_rate"]
        ratios["c-move"] = {"best": mr, "median": mr_med}
        verdicts.append((f"C-MOVE: ClinicBox {mr:.2f}× Orthanc's rate (best; median {mr_med:.2f}×), "
                         f"target ≥ {TARGET_MOVE_VS_ORTHANC:.0f}×", mr >= TARGET_MOVE_VS_ORTHANC))
    else:
        verdicts.append(("C-MOVE: no successful run to compare", False))

    if profile:
        print("\nClinicBox under py-spy during the query loop "
              f"({profile.get('samples', 0)} non-idle samples in {profile.get('busy_s', 0):.1f} s):")
        if "error" in profile:
            print("  py-spy failed: " + profile["error"])
        else:
            print("  top functions by own samples:")
            for f, n in profile["top_self"][:12]:
                print(f"    {100 * n / max(1, profile['samples']):5.1f}%  {f}")
            print("  top functions including callees:")
            for f, n in profile["top_inclusive"][:20]:
                print(f"    {100 * n / max(1, profile['samples']):5.1f}%  {f}")
            print(f"  collapsed stacks: {profile['collapsed']}")
    if plans:
        print("\nClinicBox SQL per query kind (first query, run in-process on the index, untimed by the server):")
        for kind, p in plans.items():
            print(f"  {kind} {p['value']!r}: {p['answers']} answers, {p['in_process_ms']:.1f} ms in-process, "
                  f"{p['statements']} SQL statements")
            for line in p["plan"]:
                print(f"      {line}")

    if warnings:
        print("\nWARNINGS:")
        for w in warnings[:30]:
            print("  " + w)
        if len(warnings) > 30:
            print(f"  ... and {len(warnings) - 30} more")
    print("\ntargets:")
    for text, ok in verdicts:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    all_met = all(ok for _t, ok in verdicts)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"query-{started:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "args": {k: str(v) for k, v in vars(args).items()},
        "environment": env, "build": info, "build_or_reuse_s": build_s,
        "archive": {"instances": plan["total"], "studies": len(plan["studies"]), "patients": n_patients},
        "client": f"{client} C-FIND SCU in this process, one association per server, TCP_NODELAY set, study root",
        "queries": queries, "latency": results, "summary": summ, "findscu_repeat": dcmtk_rows, "moves": moves, "move_summary": move_summary,
        "ratios": ratios, "verdicts": [{"target": t, "met": ok} for t, ok in verdicts],
        "warnings": warnings, "profile": profile, "plans": plans, "all_targets_met": all_met,
    }, indent=2))
    print(f"\nresults: {out.relative_to(REPO)}")
    print(f"all targets met: {'yes' if all_met else 'NO'}")
    if alive:
        print(f"WARNING: processes still alive: {alive}")
    if any(not m["ok"] for runs in moves.values() for m in runs):
        return 1
    return 3 if (args.strict and not all_met) else 0


if __name__ == "__main__":
    sys.exit(main())
