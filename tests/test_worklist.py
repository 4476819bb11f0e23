"""Modality Worklist SCP (C-FIND) with DCMTK ``findscu -W`` as the modality; the worklist CLI and CSV import.

One ClinicBox serves the whole module: the orders arrive once through ``worklist import`` of one CSV
(plus one ``worklist add``).  Tests that change orders (cancel, MPPS, rename, more adds) work on
orders of their own, on dates, modalities and names no other test's expectations include.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pydicom
import pytest

from tests.support.peers import REPO, ClinicBox, dcmtk
from tests.support.synth import ORG_ROOT

pytestmark = pytest.mark.xdist_group("worklist")

SPS = "ScheduledProcedureStepSequence"
UID1 = ORG_ROOT + "77.1"

# What real modalities ask (DCMTK's wlistqry examples, merged): every patient/order key at the
# top level, every scheduled step key inside the SPS item; empty code sequences.
FULL_QUERY = """
(0008,0005) CS []                                       # SpecificCharacterSet
(0008,0050) SH []                                       # AccessionNumber
(0008,0090) PN []                                       # ReferringPhysicianName
(0010,0010) PN []                                       # PatientName
(0010,0020) LO []                                       # PatientID
(0010,0030) DA []                                       # PatientBirthDate
(0010,0040) CS []                                       # PatientSex
(0010,2000) LO []                                       # MedicalAlerts
(0010,2110) LO []                                       # Allergies
(0020,000d) UI []                                       # StudyInstanceUID
(0032,1032) PN []                                       # RequestingPhysician
(0032,1060) LO []                                       # RequestedProcedureDescription
(0032,1064) SQ (Sequence with explicit length #=0)      # RequestedProcedureCodeSequence
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
(0040,0100) SQ                                          # ScheduledProcedureStepSequence
  (fffe,e000) na                                          # Item
    (0008,0060) CS []                                       # Modality
    (0040,0001) AE []                                       # ScheduledStationAETitle
    (0040,0002) DA []                                       # ScheduledProcedureStepStartDate
    (0040,0003) TM []                                       # ScheduledProcedureStepStartTime
    (0040,0006) PN []                                       # ScheduledPerformingPhysicianName
    (0040,0007) LO []                                       # ScheduledProcedureStepDescription
    (0040,0008) SQ (Sequence with explicit length #=0)      # ScheduledProtocolCodeSequence
    (fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
    (0040,0009) SH []                                       # ScheduledProcedureStepID
    (0040,0010) SH []                                       # ScheduledStationName
    (0040,0011) SH []                                       # ScheduledProcedureStepLocation
    (0040,0020) CS []                                       # ScheduledProcedureStepStatus
  (fffe,e00d) na (ItemDelimitationItem for re-encoding)   # ItemDelimitationItem
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
(0040,1001) SH []                                       # RequestedProcedureID
(0040,1003) SH []                                       # RequestedProcedurePriority
"""

# A terse one (wlistqry5-like): no SpecificCharacterSet, a few keys only.
SHORT_QUERY = """
(0010,0010) PN []                                       # PatientName
(0040,0100) SQ                                          # ScheduledProcedureStepSequence
  (fffe,e000) na                                          # Item
    (0008,0060) CS []                                       # Modality
    (0040,0002) DA []                                       # ScheduledProcedureStepStartDate
    (0040,0009) SH []                                       # ScheduledProcedureStepID
  (fffe,e00d) na (ItemDelimitationItem for re-encoding)   # ItemDelimitationItem
(fffe,e0dd) na (SequenceDelimitationItem for re-encod.) # SequenceDelimitationItem
"""

# Row numbers (the header is row 1) matter: the import reports refused rows by number.
CSV = f"""\
patient_id,patient_name,birth_date,sex,alerts,allergies,accession,procedure_id,procedure,procedure_code,referring_physician,study_uid,modality,station_ae,station_name,at,performing_physician,step_id,step_description,location
P001,DOE^JOHN,1970-01-02,M,Pacemaker,Iodine;Latex,ACC001,RP001,US abdomen,USABD,SMITH^ANNA,{UID1},US,US_ROOM1,USR1,2030-05-06 08:00,WHO^DOC,SPS001,Liver and kidneys,ROOM 1
P002,DOE^JANE,,F,,,,,Chest PA,,,,CR,CR_ROOM,,2030-05-06 13:30,,,,
P003,ROE^RICHARD,,,,,ACC003,,US neck,,JONES^BOB,,US,US_ROOM1,,2030-05-07 09:00,,,,
P004,MOE^MAX,,,,,ACC004,,Hand,,,,DX,DX_ROOM,,2030-05-08 23:00,,,,
P005,POE^EDGAR,,,,,ACC005,,Two steps,,,,US,US_ROOM1,,2030-05-09 01:00,,S5A,,
P005,POE^EDGAR,,,,,ACC005,,Two steps,,,,CR,CR_ROOM,,2030-05-09 10:00,,S5B,,
P020,,,,,,,,Nameless,,,,US,US_ROOM1,,2030-05-10 09:00,,,,
P021,BAD^DATE,,,,,,,Bad date,,,,US,US_ROOM1,,2030-02-30 10:00,,,,
P022,BAD^MODALITY,,,,,,,Bad modality,,,,U/S,US_ROOM1,,2030-05-10 09:00,,,,
P003,ROE^ROBERT,,,,,ACC011,,Renamed,,,,US,US_ROOM1,,2030-05-10 10:00,,,,
P006,Wróbel^Łukasz,,,,,ACC006,,Fundus,,,,OP,OP_ROOM,,2030-05-11 09:00,,,,
P007,Müller^Jürgen,,,,,ACC007,,Fundus,,,,OP,OP_ROOM,,2030-05-11 10:00,,,,
P009,CANCEL^ME,,,,,ACC009,,Bitewing,,,,IO,IO_ROOM,,2030-05-13 09:00,,,,
P010,KEEP^NAME,,,,,ACC010,,Follow-up,,,,MG,MG_ROOM,,2030-05-14 09:00,,,,
P013,DONE^SOON,,,,,ACC013,,Angio,,,,XA,XA_ROOM,,2030-05-15 09:00,,,,
"""
# One order of 12 steps whose answers are ~7 KB each (100 medical alerts): answers larger than a
# small PDU, and more of them than one 64 KB batch of answers.
BIG_ALERTS = [f"ALERT {n:03d} " + "X" * 50 for n in range(100)]
CSV += "".join(f"P050,BIG^ALERTS,,,{';'.join(BIG_ALERTS)},,ACC050,,Big,,,,OT,OT_ROOM,,2030-08-01 15:{2 * n:02d}"
               ",,,,\n" for n in range(12))

# What a spreadsheet writes: Windows-1252, no BOM.
CSV_CP1252 = """\
patient_id,patient_name,accession,procedure,modality,station_ae,at
P040,Gärtner^Zoë,ACC040,Panoramic,PX,PX_ROOM,2030-07-01 11:00
"""

TYPE1_TOP = ("PatientName", "PatientID", "StudyInstanceUID", "RequestedProcedureID")
TYPE1_SPS = ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
             "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID")


class Worklist:
    """The module's server, its query files and a findscu -W runner."""

    def __init__(self, box: ClinicBox, tmp: Path) -> None:
        self.box, self.tmp = box, tmp
        self.queries = {}
        self._n = itertools.count()
        self.findscu = dcmtk("findscu")
        for name, text in (("full", FULL_QUERY), ("short", SHORT_QUERY)):
            dump, dcm = tmp / f"{name}.dump", tmp / f"{name}.dcm"
            dump.write_text(text)
            subprocess.run([dcmtk("dump2dcm"), str(dump), str(dcm)], check=True, capture_output=True)
            self.queries[name] = dcm

    def find(self, *keys: str, aet: str = "MWLSCU", query: str = "full", expect_rc: int | None = 0,
             findscu_options: tuple[str, ...] = ()):
        """Answers (pydicom datasets, in arrival order) and the findscu run; ``keys`` are -k overrides."""
        out = self.tmp / f"rsp-{next(self._n)}"
        out.mkdir()
        r = subprocess.run([self.findscu, "-W", "-v", *findscu_options, "-aet", aet, "-aec", "CLINICBOX",
                            "-to", "10", "-X", "-od", str(out), "127.0.0.1", str(self.box.port),
                            str(self.queries[query]), *[a for k in keys for a in ("-k", k)]],
                           capture_output=True, text=True, timeout=60, check=False)
        if expect_rc is not None:
            assert r.returncode == expect_rc, r.stdout + r.stderr
        return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], r

    def steps(self, *keys: str, **kw) -> list[tuple[str, str]]:
        """(AccessionNumber, SPS ID) of each answer, sorted."""
        answers, _ = self.find(*keys, **kw)
        return sorted((str(a.AccessionNumber), str(a[SPS][0].ScheduledProcedureStepID)) for a in answers)

    def accessions(self, *keys: str, **kw) -> list[str]:
        return sorted({acc for acc, _ in self.steps(*keys, **kw)})

    def real(self, steps) -> list[tuple[str, str]]:
        """``steps`` with ACC002 (P002's order has a generated accession number) replaced by the real one."""
        return [(acc.replace("ACC002", self.acc2), sid.replace("ACC002", self.acc2)) for acc, sid in steps]


def sps(key: str) -> str:
    """A -k override for a key inside the (first) Scheduled Procedure Step item."""
    return f"{SPS}[0].{key}"


def device(name: str, aet: str, *extra: str) -> list[str]:
    return ["devices", "add", name, "--ae", aet, "--host", "127.0.0.1", "--port", "104", "--role", "modality", *extra]


def clis(box: ClinicBox, *commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Several ``clinicbox`` CLI commands on the server's data dir, run at the same time (like several desks)."""
    env = {k: v for k, v in os.environ.items() if k != "CLINICBOX_CONFIG"}
    procs = [(args, subprocess.Popen([sys.executable, "-m", "clinicbox", *args, "--data-dir", str(box.data_dir)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
             for args in commands]
    done = []
    for args, p in procs:
        out, err = p.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def wl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worklist")
    box = ClinicBox(tmp / "data").start()
    try:
        csv_path, cp1252_path = tmp / "orders.csv", tmp / "excel.csv"
        csv_path.write_text(CSV, encoding="utf-8")
        cp1252_path.write_bytes(CSV_CP1252.encode("cp1252"))
        w = Worklist(box, tmp)
        *devices, w.import_run, w.import_cp1252, w.multi_station = clis(
            box,
            device("MWL-SCU", "MWLSCU"),
            device("LATIN-DEV", "LATIN_DEV", "--charset", "ISO_IR 100"),
            device("UTF-DEV", "UTF_DEV", "--charset", "ISO_IR 192"),
            device("US-ROOM-1", "US_ROOM1"),
            ["worklist", "import", str(csv_path), "--by", "test"],
            ["worklist", "import", str(cp1252_path)],
            ["worklist", "add", "--patient-id", "P008", "--patient-name", "ENDO^MULTI", "--modality", "ES",
             "--station-ae", "AA32", "--station-ae", "AA33", "--at", "2030-05-12 09:00", "--procedure", "Gastroscopy",
             "--accession", "ACC008", "--json"])
        for r in devices:
            assert r.returncode == 0, r.stderr
        p002 = json.loads(box.cli("worklist", "list", "--date", "2030-05-06", "--json").stdout)
        w.acc2 = next((o["accession_number"] for o in p002 if o["patient_id"] == "P002"), "P002-NOT-ADDED")
        yield w
    finally:
        box.stop()


def active_steps(box: ClinicBox) -> list[tuple[str, str]]:
    orders = json.loads(box.cli("worklist", "list", "--date", "all", "--json").stdout)
    return sorted((o["accession_number"], s["step_id"]) for o in orders for s in o["steps"]
                  if s["status"] in ("SCHEDULED", "IN PROGRESS"))


# --- CSV import and the CLI ------------------------------------------------------------------------

def test_csv_import_reports_bad_rows_by_number_and_keeps_the_good_ones(wl):
    r = wl.import_run
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "added 11 order(s) with 23 step(s); 4 refused", r.stdout
    refused = {line.strip().split(":", 1)[0]: line.strip() for line in lines[1:]}
    assert set(refused) == {"row 8", "row 9", "row 10", "row 11"}, r.stdout
    assert refused["row 8"].startswith("row 8: patient_name: is required")
    assert refused["row 9"].startswith("row 9: at: '2030-02-30 10:00' is not a date")
    assert refused["row 10"].startswith("row 10: modality: 'U/S' is not a modality code")
    assert refused["row 11"].startswith("row 11: patient_id: patient ID P003 is already known with name "
                                        "'ROE^RICHARD'")
    orders = {o["patient_id"] + "/" + o["accession_number"]: o
              for o in json.loads(wl.box.cli("worklist", "list", "--date", "all", "--json").stdout)}
    pids = {k.split("/")[0] for k in orders}
    assert not pids & {"P020", "P021", "P022"}, "refused rows were added"
    assert "P003/ACC011" not in orders, "a changed name was taken without --confirm"
    assert orders["P003/ACC003"]["patient_name"] == "ROE^RICHARD"
    two = orders["P005/ACC005"]
    assert [(s["step_id"], s["modality"], s["station_ae_titles"], s["start_date"], s["start_time"])
            for s in two["steps"]] == [("S5A", "US", "US_ROOM1", "20300509", "010000"),
                                       ("S5B", "CR", "CR_ROOM", "20300509", "100000")]
    assert [k for k in orders if k.startswith("P005/")] == ["P005/ACC005"], "rows sharing an accession: one order"
    assert orders["P006/ACC006"]["patient_name"] == "Wróbel^Łukasz"


def test_csv_from_a_spreadsheet_is_read_as_windows_1252(wl):
    assert wl.import_cp1252.stdout.startswith("added 1 order(s) with 1 step(s); 0 refused"), wl.import_cp1252.stdout
    answers, _ = wl.find("SpecificCharacterSet=ISO_IR 192", "AccessionNumber=ACC040")
    assert [str(a.PatientName) for a in answers] == ["Gärtner^Zoë"]


def test_list_and_show_reflect_the_orders(wl):
    day, shown, table, missing = clis(wl.box, ["worklist", "list", "--date", "2030-05-06", "--json"],
                                      ["worklist", "show", "ACC001", "--json"],
                                      ["worklist", "list", "--date", "2030-05-06"],
                                      ["worklist", "show", "NO_SUCH_ACC"])
    day = json.loads(day.stdout)
    assert sorted(o["patient_id"] for o in day) == ["P001", "P002"]
    assert all(o["status"] == "SCHEDULED" for o in day)
    shown = json.loads(shown.stdout)
    assert (shown["status"], shown["patient_name"], shown["requested_procedure_id"], shown["study_instance_uid"],
            shown["referring_physician_name"]) == ("SCHEDULED", "DOE^JOHN", "RP001", UID1, "SMITH^ANNA")
    assert [(s["step_id"], s["status"], s["location"], s["performing_physician_name"]) for s in shown["steps"]] == \
        [("SPS001", "SCHEDULED", "ROOM 1", "WHO^DOC")]
    assert shown["history"][0]["who"] == "test" and shown["history"][0]["what"] == "created"
    assert "ACC001" in table.stdout and wl.acc2 in table.stdout and "ACC003" not in table.stdout
    assert missing.returncode == 1 and "no order" in missing.stderr


def test_add_without_accession_generates_unique_numbers(wl):
    """Three desks adding at once (three processes): three different generated accession numbers."""
    runs = clis(wl.box, *[["worklist", "add", "--patient-id", f"P03{n}", "--patient-name", f"ACCN^NUMBER{n}",
                           "--modality", "RF", "--station-ae", "RF_ROOM", "--at", "2030-06-01 15:00",
                           "--procedure", "Swallow", "--json"] for n in range(3)])
    added = []
    for r in runs:
        assert r.returncode == 0, r.stderr
        added.append(json.loads(r.stdout))
    accessions = [a["accession_number"] for a in added]
    assert len(set(accessions)) == 3, accessions
    prefix = "CB" + date.today().strftime("%y%m%d")
    assert all(re.fullmatch(re.escape(prefix) + r"\d{4}", a) for a in accessions), accessions
    # the generated number is also the Requested Procedure ID and names the step
    assert all(a["requested_procedure_id"] == a["accession_number"] for a in added)
    assert all(a["step_ids"] == [a["accession_number"] + "-1"] for a in added)
    assert wl.accessions(sps("Modality=RF")) == sorted(accessions)


def test_changed_patient_name_needs_confirm(wl):
    args = ["worklist", "add", "--patient-id", "P010", "--patient-name", "KEEP^NEWNAME", "--modality", "MG",
            "--station-ae", "MWL-SCU", "--at", "2030-05-14 10:00", "--procedure", "Second view", "--accession",
            "ACC010B", "--json"]
    refused = wl.box.cli(*args, check=False)
    assert refused.returncode == 1
    assert "--patient-id: patient ID P010 is already known with name 'KEEP^NAME'" in refused.stderr
    assert "--confirm" in refused.stderr
    answers, _ = wl.find("PatientID=P010")
    assert [(str(a.AccessionNumber), str(a.PatientName)) for a in answers] == [("ACC010", "KEEP^NAME")], \
        "the refused order was kept, or the name changed"

    ok = wl.box.cli(*args, "--confirm", check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["patient_reused"] is True
    answers, _ = wl.find("PatientID=P010")
    assert sorted((str(a.AccessionNumber), str(a.PatientName)) for a in answers) == \
        [("ACC010", "KEEP^NEWNAME"), ("ACC010B", "KEEP^NEWNAME")], "the confirmed name is the patient's name"
    # --station-ae took the device name MWL-SCU and scheduled its AE title
    assert {str(a[SPS][0].ScheduledStationAETitle) for a in answers} == {"MG_ROOM", "MWLSCU"}


# --- matching ----------------------------------------------------------------------------------------

def test_multi_station_order_added(wl):
    r = wl.multi_station
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accession_number"] == "ACC008"


MATCHING = [  # (-k overrides, expected (accession, SPS ID)); ACC002 stands for P002's generated accession
    # single value matching
    (["PatientID=P003"], [("ACC003", "ACC003-1")]),
    (["AccessionNumber=ACC005"], [("ACC005", "S5A"), ("ACC005", "S5B")]),
    ([sps("Modality=DX")], [("ACC004", "ACC004-1")]),
    ([sps("Modality=CR")], [("ACC002", "ACC002-1"), ("ACC005", "S5B")]),
    ([sps("ScheduledStationAETitle=DX_ROOM")], [("ACC004", "ACC004-1")]),
    ([sps("Modality=US"), sps("ScheduledStationAETitle=US_ROOM1"), sps("ScheduledProcedureStepStartDate=20300507")],
     [("ACC003", "ACC003-1")]),
    # a step for two stations is found by either
    ([sps("ScheduledStationAETitle=AA32")], [("ACC008", "ACC008-1")]),
    ([sps("ScheduledStationAETitle=AA33")], [("ACC008", "ACC008-1")]),
    ([sps("ScheduledStationAETitle=AA3")], []),
    # person names: single value and wildcards, case-insensitive by default
    (["ReferringPhysicianName=SMITH^ANNA"], [("ACC001", "SPS001")]),
    (["ReferringPhysicianName=smith^anna"], [("ACC001", "SPS001")]),
    (["ReferringPhysicianName=JON*"], [("ACC003", "ACC003-1")]),
    (["PatientName=doe^jane"], [("ACC002", "ACC002-1")]),
    # identifiers
    (["RequestedProcedureID=RP001"], [("ACC001", "SPS001")]),
    (["RequestedProcedureID=ACC004"], [("ACC004", "ACC004-1")]),     # defaults to the accession number
    ([f"StudyInstanceUID={UID1}"], [("ACC001", "SPS001")]),
    # scheduled date: single value, open start, open end, closed range
    ([sps("ScheduledProcedureStepStartDate=20300506")], [("ACC001", "SPS001"), ("ACC002", "ACC002-1")]),
    ([sps("ScheduledProcedureStepStartDate=-20300507")],
     [("ACC001", "SPS001"), ("ACC002", "ACC002-1"), ("ACC003", "ACC003-1")]),
    ([sps("ScheduledProcedureStepStartDate=20300507-"), sps("Modality=US")],
     [("ACC003", "ACC003-1"), ("ACC005", "S5A")]),
    ([sps("ScheduledProcedureStepStartDate=20300507-20300509")],
     [("ACC003", "ACC003-1"), ("ACC004", "ACC004-1"), ("ACC005", "S5A"), ("ACC005", "S5B")]),
    # scheduled time: ranges (an upper bound covers the whole minute/hour it names)
    ([sps("ScheduledProcedureStepStartTime=1200-1400")], [("ACC002", "ACC002-1")]),
    ([sps("ScheduledProcedureStepStartTime=-0100")], [("ACC005", "S5A")]),
    ([sps("ScheduledProcedureStepStartTime=2200-"), sps("ScheduledProcedureStepStartDate=20300508")],
     [("ACC004", "ACC004-1")]),
    # date range + time range = one date-time span (PS3.4 C.2.2.2.5.1): 8 May 22:00 to 9 May 02:00
    ([sps("ScheduledProcedureStepStartDate=20300508-20300509"), sps("ScheduledProcedureStepStartTime=2200-0200")],
     [("ACC004", "ACC004-1"), ("ACC005", "S5A")]),
    # 6 May 09:00 to 7 May 08:00: not 6 May 08:00, not 7 May 09:00
    ([sps("ScheduledProcedureStepStartDate=20300506-20300507"), sps("ScheduledProcedureStepStartTime=0900-0800")],
     [("ACC002", "ACC002-1")]),
]


@pytest.mark.parametrize("keys, expected", MATCHING, ids=[" ".join(k).replace(SPS + "[0].", "") for k, _ in MATCHING])
def test_matching_rule(wl, keys, expected):
    assert wl.steps(*keys) == sorted(wl.real(expected))


def test_patient_name_wildcards_are_case_insensitive(wl):
    doe = sorted(wl.real([("ACC001", "SPS001"), ("ACC002", "ACC002-1")]))
    assert wl.steps("PatientName=DOE*") == doe
    assert wl.steps("PatientName=doe*") == doe
    assert wl.steps("PatientName=Do*", sps("Modality=US")) == [("ACC001", "SPS001")]

    def names(*keys):
        return sorted(str(a.PatientName) for a in wl.find(*keys)[0])

    assert names("PatientName=?OE*") == ["DOE^JANE", "DOE^JOHN", "MOE^MAX", "POE^EDGAR", "POE^EDGAR", "ROE^RICHARD"]
    assert names("PatientName=?oe^*") == names("PatientName=?OE*")
    assert names("PatientName=DOE^J?HN") == ["DOE^JOHN"]
    assert names("PatientName=Doe") == [], "single value matching is not prefix matching"


def test_universal_query_returns_every_active_step(wl):
    got = wl.steps()
    assert got == active_steps(wl.box)
    accessions = {acc for acc, _ in got}
    assert {"ACC001", "ACC003", "ACC004", "ACC006", "ACC007", "ACC008"} <= accessions
    assert ("ACC005", "S5A") in got and ("ACC005", "S5B") in got
    # answers come in scheduled order
    answers, _ = wl.find()
    starts = [a[SPS][0].ScheduledProcedureStepStartDate + a[SPS][0].ScheduledProcedureStepStartTime for a in answers]
    assert starts == sorted(starts)


def test_unsupported_key_with_a_value_is_matched_universally_with_a_warning(wl):
    answers, r = wl.find("RequestedProcedureDescription=NOTHING-LIKE-THIS*", sps("Modality=OP"))
    assert sorted(str(a.AccessionNumber) for a in answers) == ["ACC006", "ACC007"]
    pending = [line for line in r.stderr.splitlines() if "Received Find Response" in line and "Final" not in line]
    assert len(pending) == 2 and all("WarningUnsupportedOptionalKeys" in line for line in pending), r.stderr
    answers, r = wl.find(sps("Modality=OP"))
    assert "WarningUnsupportedOptionalKeys" not in r.stderr and len(answers) == 2


def test_value_inside_a_code_sequence_item_is_an_unsupported_key_too(wl):
    """A protocol code asked for is not matched: the modality must be warned (0xFF01), as for other keys."""
    answers, r = wl.find(sps("ScheduledProtocolCodeSequence[0].CodeValue=NOSUCHCODE"), sps("Modality=OP"))
    assert sorted(str(a.AccessionNumber) for a in answers) == ["ACC006", "ACC007"]  # matched universally
    pending = [line for line in r.stderr.splitlines() if "Received Find Response" in line and "Final" not in line]
    assert len(pending) == 2
    assert all("WarningUnsupportedOptionalKeys" in line for line in pending), \
        "a key with a value inside a sequence item was ignored without the 0xFF01 warning:\n" + "\n".join(pending)


# --- what the answers hold -----------------------------------------------------------------------------

def _tags(ds) -> set:
    return {e.tag for e in ds}


def test_answers_hold_exactly_the_requested_keys_with_our_values(wl):
    query = pydicom.dcmread(wl.queries["full"])
    answers, _ = wl.find(sps("ScheduledProcedureStepStartDate=20300506"))
    assert len(answers) == 2
    for a in answers:
        assert _tags(a) == _tags(query), "every requested key, and only those, comes back"
        assert _tags(a[SPS][0]) == _tags(query[SPS][0])
        assert len(a[SPS].value) == 1
    full, bare = sorted(answers, key=lambda a: str(a.PatientID))

    assert full.SpecificCharacterSet == "ISO_IR 100"
    assert (full.AccessionNumber, full.ReferringPhysicianName, full.PatientName, full.PatientID,
            full.PatientBirthDate, full.PatientSex, full.MedicalAlerts, list(full.Allergies), full.StudyInstanceUID,
            full.RequestedProcedureDescription, full.RequestedProcedureID, full.RequestedProcedurePriority) == \
        ("ACC001", "SMITH^ANNA", "DOE^JOHN", "P001", "19700102", "M", "Pacemaker", ["Iodine", "Latex"], UID1,
         "US abdomen", "RP001", "ROUTINE")
    assert "RequestingPhysician" in full and full["RequestingPhysician"].is_empty, "requested but unknown: empty"
    (code,) = full.RequestedProcedureCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("USABD", "99CLINICBOX", "US abdomen")
    step = full[SPS][0]
    assert (step.Modality, step.ScheduledStationAETitle, step.ScheduledProcedureStepStartDate,
            step.ScheduledProcedureStepStartTime, step.ScheduledPerformingPhysicianName,
            step.ScheduledProcedureStepDescription, step.ScheduledProcedureStepID, step.ScheduledStationName,
            step.ScheduledProcedureStepLocation, step.ScheduledProcedureStepStatus) == \
        ("US", "US_ROOM1", "20300506", "080000", "WHO^DOC", "Liver and kidneys", "SPS001", "USR1", "ROOM 1",
         "SCHEDULED")
    (protocol,) = step.ScheduledProtocolCodeSequence
    assert protocol.CodeValue == "USABD"

    # an order with only the required fields: the rest comes back empty, generated Type 1 values filled in
    assert (bare.PatientID, bare.AccessionNumber) == ("P002", wl.acc2)
    assert re.fullmatch(r"CB\d{10}", bare.AccessionNumber)
    for kw in ("ReferringPhysicianName", "PatientBirthDate", "MedicalAlerts", "Allergies", "RequestingPhysician"):
        assert kw in bare and bare[kw].is_empty, kw
    assert bare.PatientSex == "F"
    assert len(bare.RequestedProcedureCodeSequence) == 0
    assert bare.RequestedProcedureID == bare.AccessionNumber
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)+", bare.StudyInstanceUID) and len(bare.StudyInstanceUID) <= 64
    bstep = bare[SPS][0]
    assert bstep.ScheduledProcedureStepID == bare.AccessionNumber + "-1"
    assert bstep.ScheduledProcedureStepDescription == "Chest PA", "the step is described by its procedure"
    for kw in ("ScheduledPerformingPhysicianName", "ScheduledStationName", "ScheduledProcedureStepLocation"):
        assert kw in bstep and bstep[kw].is_empty, kw


@pytest.mark.parametrize("options", [("-xi",), ("-pdu", "4096"), ("-xi", "-pdu", "4096")],
                         ids=["implicit-vr", "pdu-4096", "implicit-vr-pdu-4096"])
def test_big_answers_in_implicit_vr_and_small_pdus(wl, options):
    """Answers larger than the modality's PDU, 86 KB of them, in the syntax it proposed: same answers."""
    reference, _ = wl.find("AccessionNumber=ACC050")
    answers, _ = wl.find("AccessionNumber=ACC050", findscu_options=options)
    assert len(reference) == len(answers) == 12
    assert sum(len(a.MedicalAlerts) for a in answers) == 1200
    assert list(answers[0].MedicalAlerts) == BIG_ALERTS
    implicit = "-xi" in options
    for ours, ref in zip(answers, reference):
        assert ours.file_meta.TransferSyntaxUID == ("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")
        assert [(e.tag, e.value) for e in ours.iterall()] == [(e.tag, e.value) for e in ref.iterall()]
    assert [a[SPS][0].ScheduledProcedureStepID for a in answers] == [f"ACC050-{n}" for n in range(1, 13)]


def test_type1_keys_are_never_empty_and_every_answer_names_its_charset(wl):
    answers, _ = wl.find()
    assert len(answers) >= 11
    for a in answers:
        assert a.SpecificCharacterSet in ("ISO_IR 100", "ISO_IR 192")
        for kw in TYPE1_TOP:
            assert str(a.get(kw, "")).strip(), (kw, a.AccessionNumber)
        for kw in TYPE1_SPS:
            assert str(a[SPS][0].get(kw, "")).strip(), (kw, a.AccessionNumber)
    assert len({str(a.StudyInstanceUID) for a in answers}) == len({str(a.AccessionNumber) for a in answers})


def test_terse_query_gets_terse_answers_with_charset(wl):
    query = pydicom.dcmread(wl.queries["short"])
    assert "SpecificCharacterSet" not in query
    answers, _ = wl.find(sps("Modality=DX"), query="short")
    (a,) = answers
    assert _tags(a) == _tags(query) | {pydicom.tag.Tag("SpecificCharacterSet")}
    assert _tags(a[SPS][0]) == _tags(query[SPS][0])
    assert (a.SpecificCharacterSet, a.PatientName, a[SPS][0].ScheduledProcedureStepStartDate,
            a[SPS][0].ScheduledProcedureStepID) == ("ISO_IR 100", "MOE^MAX", "20300508", "ACC004-1")


# --- character sets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("aet, asked, charset", [
    ("LATIN_DEV", "ISO_IR 192", "ISO_IR 100"),    # the device's own setting wins over what it asks
    ("LATIN_DEV", "", "ISO_IR 100"),
    ("UTF_DEV", "", "ISO_IR 192"),
    ("UTF_DEV", "ISO_IR 100", "ISO_IR 192"),
    ("MWLSCU", "ISO_IR 192", "ISO_IR 192"),       # no device setting: what the query asks
    ("MWLSCU", "ISO_IR 100", "ISO_IR 100"),
    ("MWLSCU", "", "ISO_IR 100"),                 # neither: worklist.charset (default Latin-1)
])
def test_non_ascii_names_in_the_device_charset(wl, aet, asked, charset):
    answers, _ = wl.find(f"SpecificCharacterSet={asked}", sps("Modality=OP"), aet=aet)
    got = {str(a.PatientID): a for a in answers}
    assert set(got) == {"P006", "P007"}
    for a in answers:
        assert a.SpecificCharacterSet == charset
    polish, german = got["P006"]["PatientName"].value, got["P007"]["PatientName"].value
    if charset == "ISO_IR 100":
        # Latin-1 keeps what it has (ó, ü), transliterates the rest (Ł -> L)
        assert polish.original_string == "Wróbel^Lukasz".encode("latin-1")
        assert german.original_string == "Müller^Jürgen".encode("latin-1")
        assert str(polish) == "Wróbel^Lukasz" and str(german) == "Müller^Jürgen"
    else:
        assert polish.original_string == "Wróbel^Łukasz".encode()
        assert german.original_string == "Müller^Jürgen".encode()
        assert str(polish) == "Wróbel^Łukasz"


def test_utf8_query_matches_a_non_ascii_name(wl):
    answers, _ = wl.find("SpecificCharacterSet=ISO_IR 192", "PatientName=Wróbel*", aet="UTF_DEV")
    assert [(str(a.PatientID), str(a.PatientName)) for a in answers] == [("P006", "Wróbel^Łukasz")]


# --- who may ask, and which stations' steps they get ------------------------------------------------------

def test_unknown_caller_is_refused_and_a_known_one_answered(wl):
    answers, r = wl.find(aet="STRANGER", expect_rc=None)
    assert r.returncode != 0 and answers == []
    assert "No Acceptable Presentation Contexts" in r.stderr, r.stderr
    assert "STRANGER may not query the worklist" in wl.box.log()
    answers, _ = wl.find(sps("Modality=DX"), aet="MWLSCU")
    assert [str(a.AccessionNumber) for a in answers] == ["ACC004"]


def test_station_without_ae_title_gets_all_stations_unless_own_station_only(wl):
    box = wl.box
    everyone = active_steps(box)
    # by default (device and config unset): every station's steps
    assert wl.steps(aet="US_ROOM1") == everyone
    stations = {str(a[SPS][0].ScheduledStationAETitle) for a in wl.find(aet="US_ROOM1")[0]}
    assert {"US_ROOM1", "CR_ROOM", "DX_ROOM"} <= stations
    box.cli(*device("US-ROOM-1", "US_ROOM1", "--own-station-only"))
    try:
        assert wl.steps(aet="US_ROOM1") == [("ACC001", "SPS001"), ("ACC003", "ACC003-1"), ("ACC005", "S5A")]
        assert wl.steps(sps("ScheduledStationAETitle="), aet="US_ROOM1") == \
            [("ACC001", "SPS001"), ("ACC003", "ACC003-1"), ("ACC005", "S5A")]
        # a query naming a station still gets that station's steps
        assert wl.steps(sps("ScheduledStationAETitle=CR_ROOM"), aet="US_ROOM1") == \
            sorted(wl.real([("ACC002", "ACC002-1"), ("ACC005", "S5B")]))
        # and other devices are not limited
        assert wl.steps(aet="MWLSCU") == everyone
    finally:
        box.cli(*device("US-ROOM-1", "US_ROOM1", "--all-stations"))
    assert wl.steps(aet="US_ROOM1") == everyone


# --- steps leave the worklist ------------------------------------------------------------------------------

def test_cancelled_order_leaves_the_worklist(wl):
    box = wl.box
    assert wl.steps("AccessionNumber=ACC009") == [("ACC009", "ACC009-1")]
    r = box.cli("worklist", "cancel", "ACC009", "--reason", "patient ill", "--by", "desk")
    assert "order ACC009 cancelled" in r.stdout
    assert wl.steps("AccessionNumber=ACC009") == []
    assert wl.steps(sps("Modality=IO")) == []
    assert "ACC009" not in {acc for acc, _ in wl.steps()}
    shown, cancelled, again = clis(box, ["worklist", "show", "ACC009", "--json"],
                                   ["worklist", "list", "--date", "all", "--status", "cancelled", "--json"],
                                   ["worklist", "cancel", "ACC009"])
    shown = json.loads(shown.stdout)
    assert shown["status"] == "CANCELLED" and [s["status"] for s in shown["steps"]] == ["CANCELLED"]
    last = shown["history"][-1]
    assert (last["who"], last["what"], last["detail"]) == ("desk", "SCHEDULED -> CANCELLED", "patient ill")
    assert [o["accession_number"] for o in json.loads(cancelled.stdout)] == ["ACC009"]
    assert again.returncode == 1 and "CANCELLED" in again.stderr


def test_started_then_completed_step_leaves_the_worklist(wl):
    """MPPS IN PROGRESS shows the step as STARTED; COMPLETED takes it off the worklist."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS

    (before,) = wl.find("AccessionNumber=ACC013")[0]
    assert before[SPS][0].ScheduledProcedureStepStatus == "SCHEDULED"
    ae = AE(ae_title="MWLSCU")
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", wl.box.port, ae_title="CLINICBOX")
    assert assoc.is_established
    try:
        item = Dataset()
        item.AccessionNumber, item.StudyInstanceUID = "ACC013", before.StudyInstanceUID
        item.RequestedProcedureID, item.ScheduledProcedureStepID = "ACC013", "ACC013-1"
        ds = Dataset()
        ds.ScheduledStepAttributesSequence = [item]
        ds.PatientName, ds.PatientID = "DONE^SOON", "P013"
        ds.PerformedProcedureStepID, ds.PerformedStationAETitle, ds.Modality = "PPS13", "XA_ROOM", "XA"
        ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = "20300515", "090500"
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        uid = generate_uid(prefix=ORG_ROOT)
        status, _ = assoc.send_n_create(ds, MPPS, uid)
        assert status.Status == 0x0000
        (during,) = wl.find("AccessionNumber=ACC013")[0]
        assert during[SPS][0].ScheduledProcedureStepStatus == "STARTED"
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        done.PerformedProcedureStepEndDate, done.PerformedProcedureStepEndTime = "20300515", "093000"
        series = Dataset()
        series.SeriesInstanceUID = generate_uid(prefix=ORG_ROOT)
        series.ReferencedImageSequence = []
        done.PerformedSeriesSequence = [series]
        status, _ = assoc.send_n_set(done, MPPS, uid)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    assert wl.steps("AccessionNumber=ACC013") == []
    assert wl.steps(sps("Modality=XA")) == []
    shown = json.loads(wl.box.cli("worklist", "show", "ACC013", "--json").stdout)
    assert shown["status"] == "COMPLETED" and [s["status"] for s in shown["steps"]] == ["COMPLETED"]


# --- the last query of each device --------------------------------------------------------------------------

def test_last_query_of_each_device_is_kept(wl):
    answers, _ = wl.find("PatientID=P007", sps("Modality=OP"), aet="UTF_DEV")
    assert len(answers) == 1
    deadline = time.monotonic() + 10
    while True:  # kept by a background write
        rows = {r["ae_title"]: r for r in json.loads(wl.box.cli("worklist", "queries", "--json").stdout)}
        row = rows.get("UTF_DEV")
        if row and row["identifier"].get("00100020", {}).get("Value") == ["P007"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert row is not None, rows
    ident = row["identifier"]
    assert ident["00100020"]["Value"] == ["P007"]
    assert ident["00400100"]["Value"][0]["00080060"]["Value"] == ["OP"]
    assert "00100010" in ident and "Value" not in ident["00100010"], "the identifier as asked, empty keys too"
    assert (row["answers"], row["status"], row["host"]) == (1, "success", "127.0.0.1")
