"""DICOM print relay end to end: DCMTK dcmpsprt + dcmprscu and a pynetdicom SCU print to ClinicBox,
a private CUPS with cups-pdf receives the pages, DCMTK dcmprscp stands in for a film printer, and
dicom3tools dciodvfy checks the Secondary Capture copies."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS

from clinicbox.printing import film as pf
from tests.support.cups import Cups, pdf_pages
from tests.support.mpps import in_progress, worklist_item
from tests.support.peers import ClinicBox, dcmtk, free_port, wait_for_port
from tests.support.synth import ORG_ROOT, base_dataset, write_ct_series

pytestmark = pytest.mark.xdist_group("print")

TEMPLATE = Path(__file__).parent / "support" / "dcmtk-print.cfg"
US, US2, CT = "US1", "US2", "CT1"
TODAY = datetime.now().strftime("%Y-%m-%d")


def us_like(folder: Path, count: int) -> list[Path]:
    """Ultrasound-like 8-bit images (a bright sector on black, speckle inside)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(prefix=ORG_ROOT), generate_uid(prefix=ORG_ROOT)
    paths = []
    for n in range(1, count + 1):
        ds = base_dataset("1.2.840.10008.5.1.4.1.1.6.1", study, series, modality="US")
        ds.InstanceNumber = n
        rows, cols = 240, 320
        yy, xx = np.mgrid[0:rows, 0:cols]
        angle = np.arctan2(xx - cols / 2, yy + 20)
        sector = (np.abs(angle) < 0.6) & (np.hypot(xx - cols / 2, yy + 20) < rows)
        speckle = np.random.default_rng(n).integers(60, 230, size=(rows, cols))
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.where(sector, speckle, 0).astype(np.uint8).tobytes()
        path = folder / f"us{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("print")
    cups = Cups().start()
    config = tmp / "clinicbox.toml"
    config.write_text(f'[print]\ndestinations = ["cups:{cups.queue}"]\ncups_server = "{cups.server}"\n'
                      f'retry_seconds = 1.0\ndpi = 100\nclinic_name = "Test Clinic"\n')
    box = ClinicBox(tmp / "data", config=config)
    standin_port = free_port()
    cfg = TEMPLATE.read_text()
    for key, value in {"@DB@": tmp / "db", "@SPOOL@": tmp / "spool", "@HOST@": "127.0.0.1", "@PORT@": box.port,
                       "@AEC@": "CLINICBOX", "@AET@": US, "@STANDIN_PORT@": standin_port,
                       "@STANDIN_AET@": "FILMSTANDIN"}.items():
        cfg = cfg.replace(key, str(value))
    (tmp / "db").mkdir()
    (tmp / "spool").mkdir()
    (tmp / "print.cfg").write_text(cfg)
    # the stand-in film printer keeps what it receives in a database of its own
    (tmp / "standin-db").mkdir()
    (tmp / "standin.cfg").write_text(cfg.replace(str(tmp / "db"), str(tmp / "standin-db")))
    box.start()
    rig = type("Rig", (), {})()
    rig.tmp, rig.box, rig.cups, rig.cfg, rig.standin_port = tmp, box, cups, tmp / "print.cfg", standin_port
    try:
        box.cli("devices", "add", "US-ROOM-1", "--ae", US, "--host", "127.0.0.1", "--port", "104", "--role", "modality")
        rig.ct = write_ct_series(tmp / "ct", 12, rows=128, cols=128)
        rig.us = us_like(tmp / "us", 4)
        yield rig
    finally:
        box.stop()
        cups.stop()


def dcmtk_print(rig, images: list[Path], cols: int, rows: int, *extra: str) -> str:
    """dcmpsprt lays out the film into a stored print object; dcmprscu sends it to ClinicBox."""
    db = rig.tmp / "db"
    before = set(db.glob("SP_*.dcm"))
    r = subprocess.run([dcmtk("dcmpsprt"), "-c", str(rig.cfg), "-p", "CLINICBOX", "-l", str(cols), str(rows),
                        *extra, *map(str, images)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    (sp,) = set(db.glob("SP_*.dcm")) - before
    r = subprocess.run([dcmtk("dcmprscu"), "-c", str(rig.cfg), "-p", "CLINICBOX", "+d", str(sp)],
                       capture_output=True, text=True, timeout=120)
    dump = r.stdout + r.stderr
    # dcmprscu exits 0 even when printing failed: read the N-ACTION response
    action = dump[dump.index("N-ACTION RSP"):]
    assert "DIMSE Status                  : 0x0000: Success" in action.split("Message Type")[0], dump[-3000:]
    return dump


def jobs(rig) -> list[dict]:
    return json.loads(rig.box.cli("print", "jobs", "--json").stdout)


def wait_job(rig, job_id: int, status: str = "done", timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = json.loads(rig.box.cli("print", "show", str(job_id), "--json").stdout)
        if job["status"] == status:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} is {job['status']}, not {status}: {job}\n{rig.box.log()[-2000:]}")


def raster(pdf: Path, out: Path, dpi: int = 30) -> list[np.ndarray]:
    """Pages as gray arrays, rasterised by poppler's pdftoppm (PGM)."""
    subprocess.run([shutil.which("pdftoppm") or "/usr/bin/pdftoppm", "-r", str(dpi), "-gray", str(pdf), str(out)],
                   check=True, capture_output=True, timeout=60)
    pages = []
    for pgm in sorted(out.parent.glob(out.name + "*.pgm")):
        data = pgm.read_bytes()
        parts = data.split(maxsplit=4)
        w, h = int(parts[1]), int(parts[2])
        pages.append(np.frombuffer(parts[4][-w * h:], dtype=np.uint8).reshape(h, w))
    return pages


def image_blocks(page: np.ndarray, min_run: int = 4) -> tuple[int, int]:
    """(rows, columns) of image areas on a rasterised film page: runs of rows (columns) where a good
    share of pixels are mid-gray (image content), not white paper, black border or thin header text."""
    mid = (page > 20) & (page < 235)
    rows_busy = mid.mean(axis=1) > 0.08
    cols_busy = mid[rows_busy].mean(axis=0) > 0.08 if rows_busy.any() else np.zeros(page.shape[1], bool)

    def runs(flags):
        count, length = 0, 0
        for f in list(flags) + [False]:
            if f:
                length += 1
            else:
                count += length >= min_run
                length = 0
        return count
    return runs(rows_busy), runs(cols_busy)


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found: install dicom3tools")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def archive_copies(rig, job: dict) -> list[Path]:
    conn = sqlite3.connect(rig.box.data_dir / "index.sqlite3")
    try:
        paths = []
        for film in job["film"]:
            for entry in film["boxes"]:
                uid = entry["sop_instance_uid"]
                if uid:
                    row = conn.execute("SELECT path FROM instances WHERE sop_instance_uid=? UNION ALL"
                                       " SELECT path FROM held_objects WHERE sop_instance_uid=?", (uid, uid)).fetchone()
                    paths.append(rig.box.data_dir / row[0])
        return paths
    finally:
        conn.close()


@pytest.mark.parametrize("layout", [
    ("ct", 1, 1, ()), ("us", 2, 2, ()), ("ct", 3, 4, ("--landscape", "--filmsize", "14INX17IN")),
], ids=["1x1-ct", "2x2-us", "3x4-ct-landscape"])
def test_dcmtk_films_reach_cups_as_pdf_pages_and_the_archive(rig, layout):
    kind, cols, rows, extra = layout
    images = (rig.ct if kind == "ct" else rig.us)[:cols * rows]
    before = {j["id"] for j in jobs(rig)}
    cups_before = set(rig.cups.pdfs())
    dcmtk_print(rig, images, cols, rows, *extra)
    (job_id,) = {j["id"] for j in jobs(rig)} - before
    job = wait_job(rig, job_id)
    assert [o["status"] for o in job["outputs"]] == ["ok"]
    film = job["film"][0]
    landscape = "--landscape" in extra
    assert film["orientation"] == ("LANDSCAPE" if landscape else "PORTRAIT")
    # our page: one per film, the film's orientation, an image area per image box
    (w, h), = pdf_pages(Path(job["pdf_path"]))
    assert (w > h) == landscape
    (page,) = raster(Path(job["pdf_path"]), rig.tmp / f"own-{job_id}")
    assert image_blocks(page) == (rows, cols)
    # what CUPS made of it (cups-pdf lays pages out on A4 portrait, rotating landscape ones)
    (cups_pdf,) = set(rig.cups.wait_for_pdfs(len(cups_before) + 1)) - cups_before
    assert len(pdf_pages(cups_pdf)) == 1
    (printed,) = raster(cups_pdf, rig.tmp / f"cups-{job_id}")
    assert (printed < 128).mean() > 0.2, "the printed page is (nearly) blank"
    assert sorted(image_blocks(printed)) == sorted((rows, cols))
    # every image box kept as a Secondary Capture that dciodvfy accepts
    copies = archive_copies(rig, job)
    assert len(copies) == cols * rows
    for path in copies[:2]:
        assert dciodvfy_errors(path) == []
        assert pydicom.dcmread(path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


def _mpps_in_progress(box, order: dict, aet: str, patient_id: str, patient_name: str) -> None:
    item = worklist_item(patient_id=patient_id, patient_name=patient_name, study_uid=order["study_instance_uid"],
                         accession=order["accession_number"], procedure_id=order["requested_procedure_id"],
                         step_id=order["step_ids"][0])
    ds = in_progress(item, station_ae=aet, modality="US")
    ae = AE(ae_title=aet)
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", box.port, ae_title="CLINICBOX")
    assert assoc.is_established
    status, _ = assoc.send_n_create(ds, MPPS, generate_uid())
    assoc.release()
    assert status.Status == 0x0000


def test_a_print_during_a_procedure_step_is_filed_under_its_patient(rig):
    r = rig.box.cli("worklist", "add", "--patient-id", "PR1", "--patient-name", "PRINT^PATTY", "--modality", "US",
                    "--station-ae", US, "--at", f"{TODAY} 10:00", "--procedure", "US neck", "--json")
    order = json.loads(r.stdout)
    _mpps_in_progress(rig.box, order, US, "PR1", "PRINT^PATTY")
    before = {j["id"] for j in jobs(rig)}
    dcmtk_print(rig, rig.us[:2], 2, 1)
    (job_id,) = {j["id"] for j in jobs(rig)} - before
    job = wait_job(rig, job_id)
    assert (job["patient_id"], job["patient_name"]) == ("PR1", "PRINT^PATTY")
    text = subprocess.run(["pdftotext", job["pdf_path"], "-"], capture_output=True, text=True).stdout
    assert "PRINT PATTY" in text and "Test Clinic" in text and US in text
    studies = json.loads(rig.box.cli("studies", "--patient-id", "PR1", "--json").stdout)
    assert [s["study_instance_uid"] for s in studies] == [order["study_instance_uid"]]
    assert studies[0]["num_instances"] == 2


def _print_scu(port: int, color: bool, film_box: dict, images: list[Dataset | None], *, aet=US2):
    """A pynetdicom Print SCU; returns the statuses of every step."""
    meta = pf.COLOR_META if color else pf.GRAYSCALE_META
    ae = AE(ae_title=aet)
    ae.add_requested_context(meta)
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINICBOX")
    assert assoc.is_established
    out = {}
    try:
        fs = Dataset()
        fs.NumberOfCopies = 1
        session_uid = generate_uid()
        status, _ = assoc.send_n_create(fs, pf.FILM_SESSION, session_uid, meta_uid=meta)
        out["session"] = status.Status
        fb = Dataset()
        for k, v in film_box.items():
            setattr(fb, k, v)
        ref = Dataset()
        ref.ReferencedSOPClassUID = pf.FILM_SESSION
        ref.ReferencedSOPInstanceUID = session_uid
        fb.ReferencedFilmSessionSequence = [ref]
        box_uid = generate_uid()
        status, attrs = assoc.send_n_create(fb, pf.FILM_BOX, box_uid, meta_uid=meta)
        out["film_box"] = status.Status
        out["film_box_comment"] = str(status.get("ErrorComment", ""))
        if status.Status != 0x0000 and not 0xB000 <= status.Status <= 0xBFFF:
            return out
        out["boxes"] = []
        for ref_item, img in zip(attrs.ReferencedImageBoxSequence, images):
            if img is None:
                continue
            ib = Dataset()
            ib.ImageBoxPosition = len(out["boxes"]) + 1
            setattr(ib, "BasicColorImageSequence" if color else "BasicGrayscaleImageSequence", [img])
            status, _ = assoc.send_n_set(ib, ref_item.ReferencedSOPClassUID, ref_item.ReferencedSOPInstanceUID,
                                         meta_uid=meta)
            out["boxes"].append(status.Status)
        status, _ = assoc.send_n_action(None, 1, pf.FILM_BOX, box_uid, meta_uid=meta)
        out["action"] = status.Status
    finally:
        assoc.release()
    return out


def _color_item(rows=96, cols=128) -> Dataset:
    item = Dataset()
    item.SamplesPerPixel = 3
    item.PhotometricInterpretation = "RGB"
    item.PlanarConfiguration = 0
    item.Rows, item.Columns = rows, cols
    item.PixelAspectRatio = [1, 1]
    item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 8, 8, 7, 0
    rgb = np.zeros((rows, cols, 3), dtype=np.uint8)
    rgb[..., 0] = 220                       # red everywhere, a blue band across: a Doppler-ish picture
    rgb[rows // 3: 2 * rows // 3, :, 2] = 255
    rgb[rows // 3: 2 * rows // 3, :, 0] = 0
    item.PixelData = rgb.tobytes()
    return item


def test_pynetdicom_prints_a_color_image(rig):
    ps_uid = generate_uid()  # chosen by the SCU: the film box refers to it
    before = {j["id"] for j in jobs(rig)}
    meta = pf.COLOR_META
    ae = AE(ae_title=US2)
    ae.add_requested_context(meta)
    assoc = ae.associate("127.0.0.1", rig.box.port, ae_title="CLINICBOX")
    assert assoc.is_established
    try:
        fs = Dataset()  # (an empty data set makes pynetdicom announce one and send nothing)
        fs.NumberOfCopies = 2
        fs.MediumType = "PAPER"
        status, _ = assoc.send_n_create(fs, pf.FILM_SESSION, ps_uid, meta_uid=meta)
        assert status.Status == 0x0000
        fb = Dataset()
        fb.ImageDisplayFormat = "STANDARD\\1,1"
        fb.FilmOrientation = "LANDSCAPE"
        fb.FilmSizeID = "A4"
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = pf.FILM_SESSION, ps_uid
        fb.ReferencedFilmSessionSequence = [ref]
        box_uid = generate_uid()
        status, attrs = assoc.send_n_create(fb, pf.FILM_BOX, box_uid, meta_uid=meta)
        assert status.Status == 0x0000
        (ref_item,) = attrs.ReferencedImageBoxSequence
        assert ref_item.ReferencedSOPClassUID == pf.COLOR_IMAGE_BOX
        ib = Dataset()
        ib.ImageBoxPosition = 1
        ib.BasicColorImageSequence = [_color_item()]
        status, _ = assoc.send_n_set(ib, ref_item.ReferencedSOPClassUID, ref_item.ReferencedSOPInstanceUID,
                                     meta_uid=meta)
        assert status.Status == 0x0000
        status, _ = assoc.send_n_action(None, 1, pf.FILM_BOX, box_uid, meta_uid=meta)
        assert status.Status == 0x0000
        status = assoc.send_n_delete(pf.FILM_SESSION, ps_uid, meta_uid=meta)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    (job_id,) = {j["id"] for j in jobs(rig)} - before
    job = wait_job(rig, job_id)
    # the page is in colour: rasterise in colour and find red and blue
    out = rig.tmp / f"color-{job_id}"
    subprocess.run(["pdftoppm", "-r", "20", job["pdf_path"], str(out)], check=True)
    ppm = sorted(rig.tmp.glob(f"color-{job_id}*.ppm"))[0].read_bytes()
    w, h = map(int, ppm.split()[1:3])
    rgb = np.frombuffer(ppm[-w * h * 3:], dtype=np.uint8).reshape(h, w, 3).astype(int)
    assert ((rgb[..., 0] > 180) & (rgb[..., 2] < 80)).mean() > 0.05   # red
    assert ((rgb[..., 2] > 180) & (rgb[..., 0] < 80)).mean() > 0.02   # blue
    (copy,) = archive_copies(rig, job)
    sc = pydicom.dcmread(copy)
    assert sc.PhotometricInterpretation == "RGB" and dciodvfy_errors(copy) == []


def test_unsupported_values_get_print_statuses_not_crashes(rig):
    good = {"ImageDisplayFormat": "STANDARD\\1,1", "FilmSizeID": "8INX10IN"}
    out = _print_scu(rig.box.port, False, {**good, "ImageDisplayFormat": "SLIDE"}, [])
    assert out["film_box"] == 0x0106 and "Image Display Format" in out["film_box_comment"]
    out = _print_scu(rig.box.port, False, {**good, "FilmSizeID": "30INX40IN"}, [])
    assert out["film_box"] == 0x0106 and "FilmSizeID" in out["film_box_comment"]
    out = _print_scu(rig.box.port, False, {**good, "MagnificationType": "SINC"}, [])
    assert out["film_box"] == 0x0106
    item = Dataset()
    item.Rows = item.Columns = 8
    item.SamplesPerPixel, item.PhotometricInterpretation = 1, "MONOCHROME2"
    item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 8, 8, 7, 0
    item.PixelData = bytes(range(64))
    out = _print_scu(rig.box.port, False, {**good, "MaxDensity": 900}, [item])
    assert out["film_box"] == pf.WARN_DENSITY and out["action"] == 0x0000   # warned, clamped, printed
    # a grayscale image sent to a colour session's image box is refused, the association goes on
    out = _print_scu(rig.box.port, True, good, [item])
    assert out["boxes"] == [0x0106] and out["action"] == pf.WARN_EMPTY_FILM_BOX
    # the service is still there
    r = subprocess.run([dcmtk("echoscu"), "-aec", "CLINICBOX", "127.0.0.1", str(rig.box.port)], capture_output=True)
    assert r.returncode == 0


def test_cups_stopped_the_job_waits_and_prints_when_cups_is_back(rig):
    rig.cups.halt()
    try:
        before = {j["id"] for j in jobs(rig)}
        cups_before = set(rig.cups.pdfs())
        dcmtk_print(rig, rig.ct[:1], 1, 1)       # the modality hears Success: the job is queued durably
        (job_id,) = {j["id"] for j in jobs(rig)} - before
        job = wait_job(rig, job_id, "waiting")
        assert "lp" in job["last_error"] and job["outputs"][0]["status"] == "failed"
        shown = rig.box.cli("print", "show", str(job_id)).stdout
        assert "failed after" in shown
    finally:
        rig.cups.run()
    job = wait_job(rig, job_id, "done")   # retried by itself (print.retry_seconds = 1 here)
    assert job["outputs"][0]["status"] == "ok" and job["outputs"][0]["attempts"] >= 2
    rig.cups.wait_for_pdfs(len(cups_before) + 1)
    # and staff can print it again
    rig.box.cli("print", "reprint", str(job_id))
    time.sleep(0.5)
    wait_job(rig, job_id, "done")
    rig.cups.wait_for_pdfs(len(cups_before) + 2)


def test_forward_to_a_dicom_film_printer(rig):
    standin = subprocess.Popen([dcmtk("dcmprscp"), "-c", str(rig.tmp / "standin.cfg"), "-p", "FILMSTANDIN"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(rig.standin_port, 20, standin)
        rig.box.cli("devices", "add", "FILM-PRINTER", "--ae", "FILMSTANDIN", "--host", "127.0.0.1", "--port",
                    str(rig.standin_port), "--role", "printer")
        rig.box.cli("devices", "add", "US-ROOM-3", "--ae", "US3", "--host", "127.0.0.1", "--port", "104",
                    "--role", "modality", "--print-to", "dicom:FILM-PRINTER")
        cfg = rig.cfg.read_text().replace(f"aetitle = {US}", "aetitle = US3")
        us3_cfg = rig.tmp / "print-us3.cfg"
        us3_cfg.write_text(cfg)
        before = {j["id"] for j in jobs(rig)}
        rig_us3 = type("R", (), {"tmp": rig.tmp, "cfg": us3_cfg})()
        dcmtk_print(rig_us3, rig.ct[:4], 2, 2)
        (job_id,) = {j["id"] for j in jobs(rig)} - before
        job = wait_job(rig, job_id)
        assert [(o["destination"], o["status"]) for o in job["outputs"]] == [("dicom:FILM-PRINTER", "ok")]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list((rig.tmp / "standin-db").glob("HG_*.dcm")):
            time.sleep(0.2)
        received = list((rig.tmp / "standin-db").glob("HG_*.dcm"))
        assert len(received) == 4, (received, rig.box.log()[-2000:])
    finally:
        standin.terminate()
        standin.wait(10)


def test_print_commands(rig):
    listing = rig.box.cli("print", "jobs").stdout
    assert "done" in listing
    r = rig.box.cli("print", "show", "9999", check=False)
    assert r.returncode == 1 and "no print job 9999" in r.stderr
    r = rig.box.cli("print", "retry", "1", check=False)
    assert r.returncode == 1 and "reprint" in r.stderr


def _associate_seeing_create_responses(rig, meta: str):
    """A print association whose N-CREATE-RSP command sets are collected (pynetdicom's send_n_create
    does not return the Affected SOP Instance UID an SCP assigned)."""
    from pynetdicom import evt

    responses = []

    def on_recv(event):
        if type(event.message).__name__ == "N_CREATE_RSP":
            responses.append(event.message.command_set)

    ae = AE(ae_title=US2)
    ae.add_requested_context(meta)
    assoc = ae.associate("127.0.0.1", rig.box.port, ae_title="CLINICBOX", evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)])
    assert assoc.is_established
    return assoc, responses


def test_instance_uids_the_scu_omits_are_generated(rig):
    meta = pf.GRAYSCALE_META
    assoc, responses = _associate_seeing_create_responses(rig, meta)
    try:
        fs = Dataset()
        fs.NumberOfCopies = 1
        status, _ = assoc.send_n_create(fs, pf.FILM_SESSION, None, meta_uid=meta)
        assert status.Status == 0x0000
        session_uid = str(responses[-1].get("AffectedSOPInstanceUID") or "")
        assert session_uid, "N-CREATE-RSP carries no Affected SOP Instance UID"
        fb = Dataset()
        fb.ImageDisplayFormat = "STANDARD\\1,1"
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = pf.FILM_SESSION, session_uid
        fb.ReferencedFilmSessionSequence = [ref]
        status, attrs = assoc.send_n_create(fb, pf.FILM_BOX, None, meta_uid=meta)
        assert status.Status == 0x0000
        box_uid = str(responses[-1].get("AffectedSOPInstanceUID") or "")
        assert box_uid and box_uid != session_uid
        assert len(attrs.ReferencedImageBoxSequence) == 1
        status = assoc.send_n_delete(pf.FILM_SESSION, session_uid, meta_uid=meta)
        assert status.Status == 0x0000
    finally:
        assoc.release()


def test_printer_status_by_n_get_of_one_attribute_and_a_warned_n_create_keeps_its_uid(rig):
    meta = pf.GRAYSCALE_META
    assoc, responses = _associate_seeing_create_responses(rig, meta)
    try:
        status, attrs = assoc.send_n_get([0x21100010], pf.PRINTER, pf.PRINTER_INSTANCE, meta_uid=meta)
        assert status.Status == 0x0000 and attrs.PrinterStatus == "NORMAL" and "PrinterName" not in attrs
        fs = Dataset()
        fs.NumberOfCopies = 1
        fs.MemoryAllocation = 1000  # not supported: a warning, but the SCP-assigned UID must reach the SCU
        status, _ = assoc.send_n_create(fs, pf.FILM_SESSION, None, meta_uid=meta)
        assert status.Status in (0x0000, pf.WARN_MEMORY_ALLOCATION)
        assert str(responses[-1].get("AffectedSOPInstanceUID") or "")
    finally:
        assoc.release()


def test_film_session_n_action_prints_every_film_box_as_one_job_of_several_pages(rig):
    meta = pf.GRAYSCALE_META
    ae = AE(ae_title=US2)
    ae.add_requested_context(meta)
    before = {j["id"] for j in jobs(rig)}
    cups_before = set(rig.cups.pdfs())
    assoc = ae.associate("127.0.0.1", rig.box.port, ae_title="CLINICBOX")
    assert assoc.is_established
    try:
        session_uid = generate_uid()
        fs = Dataset()
        fs.NumberOfCopies = 1
        assert assoc.send_n_create(fs, pf.FILM_SESSION, session_uid, meta_uid=meta)[0].Status == 0
        for orientation in ("PORTRAIT", "LANDSCAPE"):
            fb = Dataset()
            fb.ImageDisplayFormat, fb.FilmOrientation = "STANDARD\\1,2", orientation
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = pf.FILM_SESSION, session_uid
            fb.ReferencedFilmSessionSequence = [ref]
            status, attrs = assoc.send_n_create(fb, pf.FILM_BOX, generate_uid(), meta_uid=meta)
            assert status.Status == 0
            for n, ref_item in enumerate(attrs.ReferencedImageBoxSequence, start=1):
                item = Dataset()
                item.Rows = item.Columns = 64
                item.SamplesPerPixel, item.PhotometricInterpretation = 1, "MONOCHROME2"
                item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 8, 8, 7, 0
                item.PixelData = np.random.default_rng(n).integers(40, 200, 64 * 64, dtype=np.uint8).tobytes()
                ib = Dataset()
                ib.ImageBoxPosition = n
                ib.BasicGrayscaleImageSequence = [item]
                status, _ = assoc.send_n_set(ib, ref_item.ReferencedSOPClassUID, ref_item.ReferencedSOPInstanceUID,
                                             meta_uid=meta)
                assert status.Status == 0
        status, _ = assoc.send_n_action(None, 1, pf.FILM_SESSION, session_uid, meta_uid=meta)
        assert status.Status == 0x0000
        # nothing left to print: the session's N-ACTION again finds no film box
        status, _ = assoc.send_n_action(None, 1, pf.FILM_SESSION, session_uid, meta_uid=meta)
        assert status.Status == pf.FAIL_NO_FILM_BOX
    finally:
        assoc.release()
    (job_id,) = {j["id"] for j in jobs(rig)} - before
    job = wait_job(rig, job_id)
    assert [(round(w) > round(h)) for w, h in pdf_pages(Path(job["pdf_path"]))] == [False, True]
    (cups_pdf,) = set(rig.cups.wait_for_pdfs(len(cups_before) + 1)) - cups_before
    assert len(pdf_pages(cups_pdf)) == 2
    assert len(archive_copies(rig, job)) == 4
