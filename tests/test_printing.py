"""The printing room without a network: film state and its checks, layout, rendering, PDF, the queue
(retry, reprint, scratch expiry).  The DICOM and CUPS path: test_print.py."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from clinicbox.archive.ingest import Archive
from clinicbox.core.config import from_mapping
from clinicbox.jobs.retention import run_retention
from clinicbox.orders.book import OrderBook
from clinicbox.printing import film as pf
from clinicbox.printing.pdf import Page, pdf_bytes
from clinicbox.printing.relay import PrintRelay
from clinicbox.printing.render import density_value, render, resize
from clinicbox.reconcile.queue import Reconciler


def _session(color=False, fmt="STANDARD\\2,2", **attrs):
    ps = pf.PrintSession(color)
    ps.create_session("1.2.3", Dataset())
    ds = Dataset()
    ds.ImageDisplayFormat = fmt
    for k, v in attrs.items():
        setattr(ds, k, v)
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = pf.FILM_SESSION, "1.2.3"
    ds.ReferencedFilmSessionSequence = [ref]
    box, outcome = ps.create_film_box("1.2.4", ds, generate_uid)
    return ps, box, outcome


def _gray(value_or_array, rows=64, cols=64, bits=8, photometric="MONOCHROME2") -> Dataset:
    item = Dataset()
    arr = value_or_array if isinstance(value_or_array, np.ndarray) else np.full((rows, cols), value_or_array)
    item.Rows, item.Columns = arr.shape
    item.SamplesPerPixel, item.PhotometricInterpretation = 1, photometric
    item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = bits, min(bits, 12), min(bits, 12) - 1, 0
    item.PixelData = arr.astype(np.uint8 if bits == 8 else "<u2").tobytes()
    ds = Dataset()
    ds.BasicGrayscaleImageSequence = [item]
    return ds


def test_display_formats_give_cells_in_image_box_order():
    assert pf.display_cells("STANDARD\\2,1") == [(0, 0, 0.5, 1), (0.5, 0, 0.5, 1)]
    assert len(pf.display_cells("STANDARD\\4,5")) == 20
    row = pf.display_cells("ROW\\1,2")
    assert row == [(0, 0, 1, 0.5), (0, 0.5, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5)]
    col = pf.display_cells("COL\\2,1")
    assert col == [(0, 0, 0.5, 0.5), (0, 0.5, 0.5, 0.5), (0.5, 0, 0.5, 1)]
    for bad in ("SLIDE", "CUSTOM\\1", "STANDARD\\0,1", "STANDARD\\1", "STANDARD\\9,9"):
        with pytest.raises(pf.PrintRefusal) as exc:
            pf.display_cells(bad)
        assert exc.value.status == pf.INVALID_VALUE


def test_film_box_checks_and_density_warning():
    _ps, box, outcome = _session(FilmSizeID="14INX17IN", FilmOrientation="LANDSCAPE", MaxDensity=450)
    assert (box.film_size, box.orientation, box.max_density) == ("14INX17IN", "LANDSCAPE", "300")
    assert outcome.status == pf.WARN_DENSITY
    with pytest.raises(pf.PrintRefusal, match="FilmOrientation"):
        _session(FilmOrientation="DIAGONAL")
    with pytest.raises(pf.PrintRefusal, match="BorderDensity"):
        _session(BorderDensity="GREY")
    ps = pf.PrintSession(False)
    with pytest.raises(pf.PrintRefusal) as exc:
        ps.set_image_box("9.9", Dataset())
    assert exc.value.status == pf.NO_SUCH_INSTANCE


def test_image_pixels_16_bit_monochrome1_and_short_data():
    ps, box, _ = _session(fmt="STANDARD\\1,1")
    uid = box.boxes[0].uid
    ps.set_image_box(uid, _gray(np.array([[0, 4095]]), bits=16, photometric="MONOCHROME1"))
    assert box.boxes[0].pixels.tolist() == [[255, 0]]
    short = _gray(7, rows=4, cols=4)
    short.BasicGrayscaleImageSequence[0].PixelData = b"\x00" * 6
    with pytest.raises(pf.PrintRefusal, match="Pixel Data"):
        ps.set_image_box(uid, short)


def test_render_layout_polarity_and_densities():
    ps, box, _ = _session(fmt="STANDARD\\2,1", BorderDensity="WHITE", EmptyImageDensity="BLACK")
    ps.set_image_box(box.boxes[0].uid, _gray(200))
    page = render(box, dpi=20)   # 8x10 in portrait: 160 x 200
    assert page.shape == (200, 160)
    left, right = page[100, 40], page[100, 120]
    assert (left, right) == (200, 0)          # image, then the empty box at black
    assert page[0, 0] == 255                  # white border
    box.boxes[0].polarity = "REVERSE"
    assert render(box, dpi=20)[100, 40] == 55
    assert density_value("150", "20", "280") == 128


def test_resize_methods():
    img = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    assert resize(img, 4, 4, "REPLICATE").tolist()[0] == [0, 0, 255, 255]
    smooth = resize(img, 4, 4, "BILINEAR")
    assert 0 < smooth[1, 1] < 255
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    assert resize(rgb, 3, 5, "CUBIC").shape == (3, 5, 3)


def test_pdf_is_valid_for_poppler(tmp_path):
    pages = [Page(np.full((50, 40), 128, np.uint8), 576, 720, ["Clinic (A)\\B", "Dóe"], 20),
             Page(np.zeros((40, 50, 3), np.uint8), 720, 576)]
    path = tmp_path / "t.pdf"
    path.write_bytes(pdf_bytes(pages, title="t"))
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True)
    if info.returncode == 127:
        pytest.fail("pdfinfo (poppler-utils) missing")
    assert "Pages:           2" in info.stdout, info.stdout + info.stderr
    text = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True).stdout
    assert "Clinic (A)\\B" in text and "Dóe" in text


@pytest.fixture
def relay(tmp_path):
    config = from_mapping({"storage": {"data_dir": str(tmp_path / "data")},
                           "print": {"destinations": [f"folder:{tmp_path / 'share'}"], "retry_seconds": 3600,
                                     "keep_days": 7}})
    archive = Archive(config.storage)
    archive.open()
    OrderBook(archive).open()
    rec = Reconciler(archive, config.intake, config.reconcile)
    rec.open()
    rec.install()
    r = PrintRelay(archive, config.print)
    r.open()
    r.config = config
    yield r
    archive.close()


def _film(relay, n_images=2):
    ps, box, _ = _session(fmt="STANDARD\\2,1")
    for b in box.boxes[:n_images]:
        ps.set_image_box(b.uid, _gray(90))
    return relay.submit([box], ps.session, "US9")


def test_a_failing_folder_waits_with_its_reason_then_retry_and_reprint(relay, tmp_path):
    job_id = _film(relay)
    relay.run_due()
    job = relay.job(job_id)
    assert job["status"] == "waiting" and "does not exist" in job["outputs"][0]["last_error"]
    assert Path(job["pdf_path"]).exists()          # rendered once, kept for the next attempt
    assert relay.run_due() == 0                    # not due before print.retry_seconds
    (tmp_path / "share").mkdir()
    relay.retry(job_id, who="desk")
    relay.run_due()
    job = relay.job(job_id)
    assert job["status"] == "done" and job["outputs"][0]["attempts"] == 2
    assert len(list((tmp_path / "share").glob("*.pdf"))) == 1
    with pytest.raises(LookupError, match="reprint"):
        relay.retry(job_id, who="desk")
    relay.reprint(job_id, who="desk")
    relay.run_due()
    assert relay.job(job_id)["status"] == "done"
    assert len(list((tmp_path / "share").glob("*.pdf"))) == 1   # same name: replaced
    conn = relay.archive.index.conn
    assert [r[0] for r in conn.execute("SELECT action FROM audit_log")] == ["print retry", "print reprint"]


def test_prints_without_a_procedure_step_wait_for_reconciliation(relay):
    job_id = _film(relay)
    uids = [b["sop_instance_uid"] for b in relay.job(job_id)["film"][0]["boxes"]]
    assert all(uids)
    held = relay.archive.index.conn.execute("SELECT count(*) FROM held_objects").fetchone()[0]
    assert held == 2 and relay.archive.index.counts()["instances"] == 0
    reasons = json.loads(relay.archive.index.conn.execute("SELECT reasons FROM reconcile_items").fetchone()[0])
    assert "no procedure step" in reasons[0]


def test_rendered_pdfs_expire_with_the_retention_job(relay, tmp_path):
    (tmp_path / "share").mkdir()
    job_id = _film(relay)
    relay.run_due()
    pdf = Path(relay.job(job_id)["pdf_path"])
    assert pdf.exists()
    assert relay.expire_scratch()["print_scratch_removed"] == 0           # younger than keep_days
    later = datetime.now(timezone.utc) + timedelta(days=8)
    assert relay.expire_scratch(now=later, dry_run=True) == {"print_scratch_due": 1}
    assert relay.expire_scratch(now=later)["print_scratch_removed"] == 1
    assert not pdf.exists()
    # the archive copies stay; a reprint renders the page again from them
    relay.reprint(job_id, who="desk")
    relay.run_due()
    assert Path(relay.job(job_id)["pdf_path"]).exists()
    # and the retention job runs the expiry (retention of studies itself disabled)
    figures = run_retention(relay.config, relay.archive)
    assert figures["enabled"] is False and "print_scratch_removed" in figures


# --- regressions from the review of 2026-11-23 -------------------------------------------------------

def _performed(relay, ae: str, pid: str, status: str, *, created_ago=timedelta(0), updated_ago=timedelta(0)):
    now = datetime.now(timezone.utc)
    stamp = lambda d: (now - d).isoformat(timespec="milliseconds")  # noqa: E731
    relay.archive.writer.call(lambda conn: conn.execute(
        "INSERT INTO performed_steps (sop_instance_uid, status, calling_ae, patient_id, patient_name, attributes,"
        " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
        (generate_uid(), status, ae, pid, f"P^{pid}", "{}", stamp(created_ago), stamp(updated_ago))))


def test_a_print_names_a_patient_only_when_one_step_fits(relay):
    assert not relay.patient_for("US9").known
    _performed(relay, "US9", "A1", "IN PROGRESS")
    assert relay.patient_for("US9").patient_id == "A1"
    _performed(relay, "US9", "B2", "COMPLETED", updated_ago=timedelta(minutes=2))
    assert not relay.patient_for("US9").known          # two patients fit: nobody is guessed
    _performed(relay, "US7", "C3", "IN PROGRESS", created_ago=timedelta(hours=13))
    assert not relay.patient_for("US7").known          # an MPPS never completed is stale
    _performed(relay, "US8", "D4", "COMPLETED", updated_ago=timedelta(minutes=30))
    assert not relay.patient_for("US8").known          # completed longer ago than print.step_minutes (10)


def test_a_destination_that_raises_anything_is_recorded_and_the_queue_goes_on(relay, tmp_path):
    (tmp_path / "share").mkdir()

    def broken(*_args):
        raise RuntimeError("association lost")

    relay.forwarders["dicom"] = broken
    first = _film(relay)
    relay.archive.writer.call(lambda conn: conn.execute(
        "INSERT INTO print_outputs (job_id, destination) VALUES (?, 'dicom:FILM')", (first,)))
    second = _film(relay)
    relay.run_due()
    one, two = relay.job(first), relay.job(second)
    assert one["status"] == "waiting" and "association lost" in one["last_error"]
    assert {o["destination"]: o["status"] for o in one["outputs"]} == {
        f"folder:{tmp_path / 'share'}": "ok", "dicom:FILM": "failed"}
    assert two["status"] == "done"
    assert relay.run_due() == 0  # the failed one waits for print.retry_seconds, not a busy loop


def test_a_job_whose_archive_copies_were_thrown_away_is_lost_not_retried_forever(relay, tmp_path):
    job_id = _film(relay)                      # no procedure step: the copies wait in reconciliation
    item = relay.archive.index.conn.execute("SELECT id FROM reconcile_items").fetchone()[0]
    rec = Reconciler(relay.archive, relay.config.intake, relay.config.reconcile)
    rec.reject(item, reason="test print", who="desk")
    rec.expire_rejected(now=datetime.now(timezone.utc) + timedelta(days=31))
    relay.run_due()
    job = relay.job(job_id)
    assert job["status"] == "lost" and "is gone" in job["last_error"]
    assert relay.run_due(now=datetime.now(timezone.utc) + timedelta(days=1)) == 0
