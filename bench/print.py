"""Print relay benchmark: time from N-ACTION to PDF spooled, and the service's memory growth.

Run by hand from the repository root::

    .venv/bin/python bench/print.py [--repeat 5] [--dpi 150]

What it does (see bench/README.md):

* starts a private CUPS scheduler with a cups-pdf queue (``tests/support/cups.py``) and a fresh
  ``clinicbox serve`` whose only print destination is that queue;
* a pynetdicom Print SCU (Basic Grayscale Print Management) prints two films, ``--repeat`` times
  each: a 4×5 film (14INX17IN) of twenty 512×512 12-bit images and a 1×1 film (14INX17IN) of one
  2048×2048 12-bit image.  Film session, film box and every image box are set up first; the clock
  starts just before the N-ACTION is sent and stops at the job's ``done_at``, the moment ``lp`` had
  handed the PDF to CUPS (rendering, PDF, archive copies included); N-ACTION's own answer time (the
  archive copies made durable) is reported beside it;
* memory: the service's VmRSS sampled every 10 ms from before the first print to the end; growth =
  peak minus the RSS just before the first N-ACTION;
* prints a table and the target verdicts (each under 1 s, RSS growth under 100 MB) and writes JSON
  to bench/results/.

Every process it starts is stopped by PID, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import numpy as np
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    from bench.common import spawn, stop_all_started, stop_process, wait_port
    from clinicbox.printing import film as pf
    from tests.support.cups import Cups
    from tests.support.peers import free_port
except ImportError as exc:  # pragma: no cover - wrong interpreter
    sys.exit(f"bench/print.py: {exc}; run it with the project venv: .venv/bin/python bench/print.py")

RESULTS_DIR = REPO / "bench" / "results"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._halt = pid, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except OSError:
                return
            time.sleep(0.01)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def gray_item(size: int, seed: int) -> Dataset:
    item = Dataset()
    item.SamplesPerPixel, item.PhotometricInterpretation = 1, "MONOCHROME2"
    item.Rows = item.Columns = size
    item.PixelAspectRatio = [1, 1]
    item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 16, 12, 11, 0
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size * 0.45) ** 2) * 1800
    noise = np.random.default_rng(seed).integers(0, 600, size=(size, size))
    item.PixelData = (body + noise).astype("<u2").tobytes()
    return item


def print_film(port: int, fmt: str, items: list[Dataset]) -> float:
    """Set the film up, then send N-ACTION; return the wall-clock time N-ACTION was sent."""
    meta = pf.GRAYSCALE_META
    ae = AE(ae_title="BENCHUS")
    ae.add_requested_context(meta)
    ae.maximum_pdu_size = 0
    ae.dimse_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINICBOX")
    if not assoc.is_established:
        raise RuntimeError("association refused")
    try:
        session_uid = generate_uid()
        fs = Dataset()
        fs.NumberOfCopies = 1
        fs.MediumType = "PAPER"
        status, _ = assoc.send_n_create(fs, pf.FILM_SESSION, session_uid, meta_uid=meta)
        fb = Dataset()
        fb.ImageDisplayFormat, fb.FilmOrientation, fb.FilmSizeID = fmt, "PORTRAIT", "14INX17IN"
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = pf.FILM_SESSION, session_uid
        fb.ReferencedFilmSessionSequence = [ref]
        box_uid = generate_uid()
        status, attrs = assoc.send_n_create(fb, pf.FILM_BOX, box_uid, meta_uid=meta)
        assert status.Status == 0, status
        for n, (ref_item, item) in enumerate(zip(attrs.ReferencedImageBoxSequence, items), start=1):
            ib = Dataset()
            ib.ImageBoxPosition = n
            ib.BasicGrayscaleImageSequence = [item]
            status, _ = assoc.send_n_set(ib, ref_item.ReferencedSOPClassUID, ref_item.ReferencedSOPInstanceUID,
                                         meta_uid=meta)
            assert status.Status == 0, status
        sent = time.time()
        status, _ = assoc.send_n_action(None, 1, pf.FILM_BOX, box_uid, meta_uid=meta)
        answered = time.time()
        assert status.Status == 0, status
        assoc.send_n_delete(pf.FILM_SESSION, session_uid, meta_uid=meta)
    finally:
        assoc.release()
    return sent, answered


def wait_done(db: Path, after_id: int, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            row = conn.execute("SELECT id, status, done_at, last_error FROM print_jobs WHERE id > ? ORDER BY id"
                               " LIMIT 1", (after_id,)).fetchone()
        finally:
            conn.close()
        if row and row[1] == "done":
            return {"id": row[0], "done_at": datetime.fromisoformat(row[2]).timestamp()}
        if row and row[1] == "waiting":
            raise RuntimeError(f"print job {row[0]} failed: {row[3]}")
        time.sleep(0.005)
    raise TimeoutError("print job not done")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="prints of each film (default 5)")
    ap.add_argument("--dpi", type=int, default=150, help="print.dpi of the service (default 150)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="clinicbox-bench-print-"))
    cups = Cups()
    proc = None
    try:
        cups.start()
        port = free_port()
        config = tmp / "clinicbox.toml"
        config.write_text(f'[print]\ndestinations = ["cups:{cups.queue}"]\ncups_server = "{cups.server}"\n'
                          f'dpi = {args.dpi}\n[server]\nbind = "127.0.0.1"\n')
        proc = spawn([sys.executable, "-m", "clinicbox", "serve", "--data-dir", str(tmp / "data"), "--port",
                      str(port), "--config", str(config)], tmp / "serve.log", cwd=REPO)
        wait_port(port, proc, "clinicbox serve")
        db = tmp / "data" / "index.sqlite3"
        films = {"4x5 of 512x512": ("STANDARD\\4,5", [gray_item(512, s) for s in range(20)]),
                 "1x1 of 2048x2048": ("STANDARD\\1,1", [gray_item(2048, 99)])}
        time.sleep(1.0)
        baseline = rss_kb(proc.pid)
        sampler = RssSampler(proc.pid)
        sampler.start()
        results = {name: [] for name in films}
        last_id = 0
        for r in range(args.repeat):
            for name, (fmt, items) in films.items():
                sent, answered = print_film(port, fmt, items)
                done = wait_done(db, last_id)
                last_id = done["id"]
                results[name].append({"n_action_answer_s": answered - sent, "spooled_s": done["done_at"] - sent})
        sampler.stop()
        growth_mb = (sampler.peak - baseline) / 1024
        pdfs = len(cups.wait_for_pdfs(args.repeat * len(films), timeout=120))
    finally:
        stop_process(proc)
        cups.stop()
        stop_all_started()
    print(f"ClinicBox print relay benchmark ({args.repeat} prints per film, print.dpi {args.dpi}, 14INX17IN; "
          f"CUPS + cups-pdf wrote {pdfs} PDFs)")
    print(f"{'film':18}  {'N-ACTION answered':>18}  {'spooled best':>12}  {'median':>8}  {'worst':>8}")
    verdicts = {}
    for name, runs in results.items():
        spooled = [x["spooled_s"] for x in runs]
        answer = statistics.median(x["n_action_answer_s"] for x in runs)
        print(f"{name:18}  {answer * 1000:>15.0f} ms  {min(spooled):>10.3f} s  {statistics.median(spooled):>6.3f} s"
              f"  {max(spooled):>6.3f} s")
        verdicts[name] = max(spooled) < 1.0
    print(f"service RSS: {baseline / 1024:.0f} MB before the first print, peak {sampler.peak / 1024:.0f} MB: "
          f"growth {growth_mb:.0f} MB")
    print("targets: " + ", ".join(f"{n} under 1 s: {'met' if ok else 'MISSED'}" for n, ok in verdicts.items())
          + f"; RSS growth under 100 MB: {'met' if growth_mb < 100 else 'MISSED'}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"print-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"results": results, "rss_baseline_kb": baseline, "rss_peak_kb": sampler.peak,
                               "dpi": args.dpi, "repeat": args.repeat}, indent=2))
    print(f"results: {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
