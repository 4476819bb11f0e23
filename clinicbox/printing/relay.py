"""The print relay: a printed film becomes archive copies and a queued job; a worker renders the job
to PDF and delivers it to each destination, retrying what fails.

:meth:`PrintRelay.submit` is what the Print SCP door calls on N-ACTION: it stores every printed
image box as a Secondary Capture object (the ingest rule: durable before anything is answered),
then commits the job with its outputs.  Only then may the modality hear Success; rendering and
delivery happen after, in :meth:`run_due` (the worker thread, or a test).  A failed delivery
(CUPS stopped, printer rejecting, film printer off) leaves the output ``failed`` with its reason
and the job ``waiting``; it is tried again after ``print.retry_seconds`` or on ``print retry``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from pydicom.uid import generate_uid

from clinicbox.archive import index as idx
from clinicbox.archive.ingest import Archive, IngestError
from clinicbox.core.config import PrintSettings
from clinicbox.orders import schema as orders_schema
from clinicbox.printing import schema
from clinicbox.printing.capture import PrintPatient, secondary_capture
from clinicbox.printing.film import FilmBox, FilmSession, ImageBox
from clinicbox.printing.pdf import Page, write_pdf
from clinicbox.printing.render import page_inches, render

log = logging.getLogger(__name__)

PRINTS = "prints"
#: an MPPS left IN PROGRESS longer than this (the modality never sent COMPLETED) names nobody's prints
STALE_STEP_HOURS = 12
HEADER_INCHES = 0.35
#: lp media names for the film sizes office paper has
_MEDIA = {"A4": "A4", "A3": "A3", "8_5INX11IN": "Letter"}


class OutputError(Exception):
    """A destination did not take the job; the message is kept as the output's last error."""


class CopiesGone(OutputError):
    """The job's archive copies no longer exist: it can never be printed again."""


#: forwarder(device name, pages' films, per film the image arrays, copies) -> None, raising OutputError
Forwarder = Callable[[str, list[dict], list[list[np.ndarray | None]], int], None]


def _utc(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds")


class PrintRelay:
    def __init__(self, archive: Archive, settings: PrintSettings) -> None:
        self.archive = archive
        self.settings = settings
        self.prints = Path(archive.store.root) / PRINTS
        self.forwarders: dict[str, Forwarder] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = threading.Lock()

    # --- life cycle ------------------------------------------------------------------------------

    def open(self) -> None:
        for migration_set in (orders_schema.migrations, schema.migrations):
            applied = idx.migrate(self.archive.db_path, migration_set)
            if applied:
                log.info("%s: applied migrations %s", migration_set.name, ", ".join(applied))
        self.prints.mkdir(exist_ok=True)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="print-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
            except Exception:
                log.exception("print worker: unexpected error (retrying)")
            self._wake.wait(1.0)
            self._wake.clear()

    # --- accepting a film (the door calls this on N-ACTION) ----------------------------------------

    def patient_for(self, calling_ae: str) -> PrintPatient:
        """Whom a print from ``calling_ae`` shows: the patient of its procedure step IN PROGRESS (begun in
        the last 12 hours) or COMPLETED in the last ``print.step_minutes``, when exactly one patient
        fits; otherwise nobody (the archive copies wait for reconciliation rather than guess)."""
        now = datetime.now(timezone.utc)
        rows = self.archive.index.conn.execute(
            "SELECT ps.modality, COALESCE(p.patient_id, ps.patient_id) AS patient_id,"
            " COALESCE(p.patient_name, ps.patient_name) AS patient_name, p.patient_birth_date, p.patient_sex,"
            " COALESCE(o.accession_number, ps.accession_number) AS accession,"
            " COALESCE(o.study_instance_uid, ps.study_instance_uid) AS study_uid"
            " FROM performed_steps ps LEFT JOIN orders o ON o.id = ps.order_pk"
            " LEFT JOIN order_patients p ON p.id = o.patient_pk"
            " WHERE ps.calling_ae = ? AND ((ps.status = 'IN PROGRESS' AND ps.created_at >= ?)"
            " OR (ps.status = 'COMPLETED' AND ps.updated_at >= ?))"
            " ORDER BY ps.status = 'IN PROGRESS' DESC, ps.updated_at DESC",
            (calling_ae, _utc(now - timedelta(hours=STALE_STEP_HOURS)),
             _utc(now - timedelta(minutes=self.settings.step_minutes)))).fetchall()
        patients = {r["patient_id"] for r in rows}
        if len(patients) != 1 or not rows[0]["patient_id"]:
            if len(patients) > 1:
                log.warning("print from %s: procedure steps of %d patients are open or just completed; "
                            "the print waits for reconciliation", calling_ae, len(patients))
            return PrintPatient()
        row = rows[0]
        return PrintPatient(row["patient_id"], row["patient_name"] or "", row["patient_birth_date"] or "",
                            row["patient_sex"] or "", row["accession"] or "", row["study_uid"] or "",
                            row["modality"] or "")

    def destinations_for(self, calling_ae: str) -> list[str]:
        row = self.archive.index.conn.execute("SELECT print_to FROM devices WHERE ae_title=? AND added_at IS NOT NULL",
                                              (calling_ae,)).fetchone()
        if row is not None and row[0]:
            return [d.strip() for d in row[0].split(",") if d.strip()]
        return list(self.settings.destinations)

    def submit(self, film_boxes: list[FilmBox], session: FilmSession, calling_ae: str) -> int:
        """Keep the films durably (archive copies + the job row) and return the job's id."""
        patient = self.patient_for(calling_ae)
        study_uid = patient.study_instance_uid or generate_uid()
        series_uid = generate_uid()
        now = datetime.now()
        films, number = [], 0
        for box in film_boxes:
            boxes = []
            for image_box in box.boxes:
                entry = {"position": image_box.position, "polarity": image_box.polarity,
                         "magnification": image_box.magnification, "requested_size_mm": image_box.requested_size_mm,
                         "sop_instance_uid": None}
                if image_box.pixels is not None:
                    number += 1
                    entry["sop_instance_uid"] = self._keep(image_box, patient, study_uid, series_uid, number,
                                                           calling_ae, session.label, now)
                boxes.append(entry)
            films.append(box.describe() | {"cells": box.cells, "boxes": boxes})
        destinations = self.destinations_for(calling_ae)
        stamp = idx.utcnow()

        def write(conn):
            cur = conn.execute(
                "INSERT INTO print_jobs (created_at, updated_at, calling_ae, color, copies, priority, medium, label,"
                " film, patient_id, patient_name, accession_number, status, next_attempt_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (stamp, stamp, calling_ae, int(session.color), session.copies, session.priority, session.medium,
                 session.label, json.dumps(films), patient.patient_id, patient.patient_name, patient.accession,
                 schema.QUEUED, stamp))
            for destination in destinations:
                conn.execute("INSERT INTO print_outputs (job_id, destination) VALUES (?,?)",
                             (cur.lastrowid, destination))
            return cur.lastrowid
        job_id = self.archive.writer.call(write)
        log.info("print job %d from %s: %d film(s), %d image(s), %s; outputs: %s", job_id, calling_ae, len(films),
                 number, "patient from the procedure step" if patient.known else "patient unknown (held)",
                 ", ".join(destinations) or "PDF in prints/ only")
        self._wake.set()
        return job_id

    def _keep(self, image_box: ImageBox, patient: PrintPatient, study_uid: str, series_uid: str, number: int,
              calling_ae: str, label: str, now: datetime) -> str:
        ds = secondary_capture(image_box.pixels, patient=patient, study_uid=study_uid, series_uid=series_uid,
                               number=number, calling_ae=calling_ae, film_label=label, when=now)
        fd, tmp = self.archive.store.new_incoming(prefix="print-")
        os.close(fd)
        try:
            ds.save_as(tmp, enforce_file_format=True)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise IngestError("failure", f"cannot write the archive copy: {exc}") from None
        return self.archive.store_incoming(Path(tmp), calling_ae=calling_ae, source="print").sop_instance_uid

    # --- rendering and delivery (the worker) -------------------------------------------------------

    def run_due(self, *, now: datetime | None = None) -> int:
        """Process every job whose next attempt is due; return how many were processed."""
        stamp = _utc(now or datetime.now(timezone.utc))
        due = [r[0] for r in self.archive.index.conn.execute(
            "SELECT id FROM print_jobs WHERE status != 'done' AND status != 'lost' AND next_attempt_at <= ?"
            " ORDER BY id", (stamp,))]
        with self._busy:
            for job_id in due:
                self.process(job_id)
        return len(due)

    def _images(self, film: dict) -> list[np.ndarray | None]:
        from pydicom import dcmread

        images = []
        for entry in film["boxes"]:
            uid = entry["sop_instance_uid"]
            if uid is None:
                images.append(None)
                continue
            path = self.archive.object_path(uid)
            if path is None:
                raise CopiesGone(f"the archive copy {uid} of image box {entry['position']} is gone (rejected in "
                                 "reconciliation?)")
            images.append(dcmread(path).pixel_array)
        return images

    def render_pdf(self, job: dict, films: list[dict], images: list[list]) -> Path:
        pages = []
        when = datetime.fromisoformat(job["created_at"]).astimezone().strftime("%Y-%m-%d %H:%M")
        for film, pixels in zip(films, images):
            box = FilmBox(uid=film["film_box"], display_format=film["display_format"],
                          orientation=film["orientation"], film_size=film["film_size"],
                          magnification=film["magnification"], border_density=film["border_density"],
                          empty_density=film["empty_density"], min_density=film["min_density"],
                          max_density=film["max_density"], trim=film["trim"], resolution=film["resolution"],
                          cells=[tuple(c) for c in film["cells"]])
            for entry, img in zip(film["boxes"], pixels):
                box.boxes.append(ImageBox("", entry["position"], img is not None and img.ndim == 3, img, 8,
                                          entry["polarity"], entry["magnification"], entry["requested_size_mm"]))
            header = []
            if self.settings.header:
                parts = [self.settings.clinic_name, job["calling_ae"], when]
                if job["patient_name"] or job["patient_id"]:
                    parts.append(f"{job['patient_name'].replace('^', ' ').strip()} (ID {job['patient_id']})")
                header = ["   ".join(p for p in parts if p)]
            dpi = self.settings.dpi * (2 if film["resolution"] == "HIGH" and self.settings.dpi < 300 else 1)
            raster = render(box, dpi=dpi, header_inches=HEADER_INCHES if header else 0.0)
            w_in, h_in = page_inches(box.film_size, box.orientation)
            pages.append(Page(raster, w_in * 72, h_in * 72, header, HEADER_INCHES * 72 if header else 0.0))
        path = self.prints / f"job-{job['id']}.pdf"
        write_pdf(path, pages, title=f"ClinicBox print job {job['id']} from {job['calling_ae']}")
        return path

    def process(self, job_id: int) -> str:
        conn = self.archive.index.conn
        job = dict(conn.execute("SELECT * FROM print_jobs WHERE id=?", (job_id,)).fetchone())
        films = json.loads(job["film"])
        outputs = [dict(r) for r in conn.execute("SELECT * FROM print_outputs WHERE job_id=? AND status != 'ok'"
                                                 " ORDER BY destination", (job_id,))]
        results: dict[str, str | None] = {}
        pdf = Path(job["pdf_path"]) if job["pdf_path"] else None
        error, lost = "", False
        try:
            images = [self._images(f) for f in films]
            if pdf is None or not pdf.exists() or job["rendered_at"] is None:
                pdf = self.render_pdf(job, films, images)
            for out in outputs:
                try:
                    self._deliver(out["destination"], job, films, images, pdf)
                    results[out["destination"]] = None
                except Exception as exc:  # one destination's trouble is that destination's, recorded
                    results[out["destination"]] = str(exc) or type(exc).__name__
                    if not isinstance(exc, OutputError):
                        log.exception("print job %d: %s failed unexpectedly", job_id, out["destination"])
                    else:
                        log.warning("print job %d: %s failed: %s", job_id, out["destination"], exc)
        except Exception as exc:  # recorded and retried later: never a loop that starves the queue
            lost = isinstance(exc, CopiesGone)
            error = f"cannot render: {exc or type(exc).__name__}"
            log.error("print job %d: %s", job_id, error)
        failed = [d for d, e in results.items() if e]
        status = schema.DONE if not error and not failed else schema.WAITING
        if lost:
            status = schema.LOST
        now = datetime.now(timezone.utc)
        retry_at = _utc(now + timedelta(seconds=self.settings.retry_seconds))
        last_error = error or "; ".join(f"{d}: {results[d]}" for d in failed)

        def write(conn):
            for destination, err in results.items():
                conn.execute("UPDATE print_outputs SET status=?, attempts = attempts + 1, last_error=?, done_at=?"
                             " WHERE job_id=? AND destination=?",
                             (schema.FAILED if err else schema.OK, err or "", None if err else _utc(now), job_id,
                              destination))
            conn.execute("UPDATE print_jobs SET status=?, attempts = attempts + 1, last_error=?, next_attempt_at=?,"
                         " pdf_path=?, rendered_at=COALESCE(rendered_at, ?), done_at=?, updated_at=? WHERE id=?",
                         (status, last_error, retry_at, str(pdf) if pdf else "", _utc(now) if pdf else None,
                          _utc(now) if status == schema.DONE else None, _utc(now), job_id))
        self.archive.writer.call(write)
        if status == schema.DONE:
            log.info("print job %d done (%s)", job_id, ", ".join(results) or f"PDF {pdf}")
        return status

    def _deliver(self, destination: str, job: dict, films: list[dict], images: list[list], pdf: Path) -> None:
        kind, _, where = destination.partition(":")
        if kind == "cups":
            self._lp(where, job, films, pdf)
        elif kind == "folder":
            folder = Path(where)
            if not folder.is_dir():  # an unmounted share must not become a local folder
                raise OutputError(f"folder {folder} does not exist (share not mounted?)")
            stamp = datetime.fromisoformat(job["created_at"]).astimezone().strftime("%Y%m%d-%H%M%S")
            dest = folder / f"{stamp}-{job['calling_ae']}-job{job['id']}.pdf"
            tmp = folder / f".{dest.name}.part"
            try:
                shutil.copyfile(pdf, tmp)
                os.replace(tmp, dest)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise OutputError(f"cannot write {dest}: {exc}") from None
        elif kind == "dicom":
            forward = self.forwarders.get("dicom")
            if forward is None:
                raise OutputError("forwarding to a DICOM printer is only possible from the running service")
            forward(where, films, images, job["copies"])
        else:
            raise OutputError(f"unknown destination {destination!r}")

    def _lp(self, queue: str, job: dict, films: list[dict], pdf: Path) -> None:
        cmd = [self.settings.lp_command]
        if self.settings.cups_server:
            cmd += ["-h", self.settings.cups_server]
        cmd += ["-d", queue, "-n", str(job["copies"]), "-t", f"ClinicBox job {job['id']} {job['calling_ae']}",
                "-o", "fit-to-page"]
        media = _MEDIA.get(films[0]["film_size"]) if films else None
        if media:
            cmd += ["-o", f"media={media}"]
        cmd.append(str(pdf))
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OutputError(f"lp did not run: {exc}") from None
        if r.returncode != 0:
            raise OutputError(f"lp: {(r.stderr or r.stdout).strip()[:300]}")
        log.info("print job %d handed to CUPS queue %s: %s", job["id"], queue, r.stdout.strip())

    # --- staff ------------------------------------------------------------------------------------

    def jobs(self, limit: int = 100) -> list[dict]:
        rows = self.archive.index.conn.execute(
            "SELECT id, created_at, calling_ae, copies, status, attempts, last_error, patient_id, patient_name,"
            " pdf_path, done_at, (SELECT group_concat(destination || '=' || status, ', ') FROM print_outputs o"
            " WHERE o.job_id = j.id) AS outputs FROM print_jobs j ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def job(self, job_id: int) -> dict:
        conn = self.archive.index.conn
        row = conn.execute("SELECT * FROM print_jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise LookupError(f"no print job {job_id} (see `clinicbox print jobs`)")
        job = dict(row)
        job["film"] = json.loads(job["film"])
        job["outputs"] = [dict(r) for r in conn.execute("SELECT destination, status, attempts, last_error, done_at"
                                                        " FROM print_outputs WHERE job_id=?", (job_id,))]
        return job

    def retry(self, job_id: int, *, who: str) -> dict:
        """Try the job's failed outputs again now (not waiting for print.retry_seconds)."""
        job = self.job(job_id)
        if job["status"] == schema.DONE:
            raise LookupError(f"print job {job_id} is done; use `clinicbox print reprint` to print it again")
        self._reschedule(job_id, who, "print retry", reset_outputs=False)
        return {"job": job_id, "status": "queued"}

    def reprint(self, job_id: int, *, who: str) -> dict:
        """Render and deliver the job again to every destination (paper jammed, PDF deleted…)."""
        self.job(job_id)
        self._reschedule(job_id, who, "print reprint", reset_outputs=True)
        return {"job": job_id, "status": "queued"}

    def _reschedule(self, job_id: int, who: str, action: str, *, reset_outputs: bool) -> None:
        now = idx.utcnow()

        def write(conn):
            if reset_outputs:
                conn.execute("UPDATE print_outputs SET status='pending' WHERE job_id=?", (job_id,))
                conn.execute("UPDATE print_jobs SET rendered_at=NULL WHERE id=?", (job_id,))
            conn.execute("UPDATE print_jobs SET status=?, next_attempt_at=?, done_at=NULL, updated_at=? WHERE id=?",
                         (schema.QUEUED, now, now, job_id))
            idx.audit(conn, who, action, {"print_job": job_id})
        self.archive.writer.call(write)
        self._wake.set()

    def expire_scratch(self, *, now: datetime | None = None, dry_run: bool = False) -> dict:
        """Remove rendered PDFs of jobs done more than ``print.keep_days`` ago (the archive copies stay)."""
        now = now or datetime.now(timezone.utc)
        cutoff = _utc(now - timedelta(days=self.settings.keep_days))
        rows = self.archive.index.conn.execute(
            "SELECT id, pdf_path FROM print_jobs WHERE status='done' AND done_at <= ? AND pdf_path != ''"
            " AND scratch_removed_at IS NULL", (cutoff,)).fetchall()
        if dry_run:
            return {"print_scratch_due": len(rows)}
        removed = 0
        for job_id, path in rows:
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
            self.archive.writer.call(lambda conn, job_id=job_id: conn.execute(
                "UPDATE print_jobs SET scratch_removed_at=?, pdf_path='' WHERE id=?", (idx.utcnow(), job_id)))
        if rows:
            log.info("print scratch: %d rendered PDF(s) older than %d days removed", removed, self.settings.keep_days)
        return {"print_scratch_removed": removed}
