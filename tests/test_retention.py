"""Retention and the integrity scrub as job functions on a small archive (no network)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import date

import pydicom
import pytest

from clinicbox.archive.ingest import Archive
from clinicbox.core import config as cfg
from clinicbox.jobs import retention
from clinicbox.jobs.retention import plan, run_retention
from clinicbox.jobs.runner import open_jobs, run_job
from tests.support.peers import REPO
from tests.support.synth import ORG_ROOT, ct_dataset

TODAY = date(2026, 11, 23)
STUDIES = {  # name: (patient id, birth date, study date, modality)
    "old-adult-us": ("R1", "19500101", "20100105", "US"),
    "recent-us": ("R2", "19600101", "20250601", "US"),
    "old-minor-us": ("R3", "20100301", "20120101", "US"),
    "old-held-us": ("R4", "19700101", "20050101", "US"),
    "old-ct": ("R5", "19700101", "19990101", "CT"),
}


def _config(tmp_path, **retention) -> cfg.Config:
    return cfg.from_mapping({
        "storage": {"data_dir": str(tmp_path / "data")},
        "backup": {"target": str(tmp_path / "target")},
        "retention": {"enabled": True, "rules": [{"modality": "US", "years": 10}], **retention}})


@pytest.fixture
def box(tmp_path):
    (tmp_path / "target").mkdir()
    config = _config(tmp_path)
    archive = Archive(config.storage)
    archive.open()
    open_jobs(archive)
    uids = {}
    for name, (pid, birth, day, modality) in STUDIES.items():
        study = pydicom.uid.generate_uid(prefix=ORG_ROOT)
        uids[name] = study
        series = pydicom.uid.generate_uid(prefix=ORG_ROOT)
        for n in range(2):
            ds = ct_dataset(study, series, n + 1, rows=4, cols=4, patient_id=pid, patient_name=f"{name}^X")
            ds.PatientBirthDate, ds.StudyDate, ds.Modality = birth, day, modality
            path = tmp_path / f"{name}-{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            archive.store_file(path)
    archive.writer.call(lambda conn: conn.execute(
        "INSERT INTO legal_holds (kind, value, reason, who, at) VALUES ('patient', 'R4', 'court case', 't', 'x')"))
    yield config, archive, uids
    archive.close()


def _verdicts(config, archive, uids):
    by_uid = {v["study_instance_uid"]: v for v in plan(config, archive, TODAY)}
    return {name: (by_uid[uid]["action"], by_uid[uid]["why"]) for name, uid in uids.items()}


def test_nothing_goes_before_a_verified_backup_then_only_what_the_rules_say(box):
    config, archive, uids = box
    v = _verdicts(config, archive, uids)
    assert v["old-adult-us"] == ("keep", "expired, but no verified backup (restore test) yet")
    assert v["recent-us"][0] == "keep" and "10 years" in v["recent-us"][1]
    assert v["old-minor-us"][0] == "keep" and "minor" in v["old-minor-us"][1]  # kept until 2038
    assert v["old-held-us"] == ("keep", "legal hold")
    assert v["old-ct"] == ("keep", "no retention rule applies")
    assert run_retention(config, archive, today=TODAY)["deleted_studies"] == 0

    assert run_job("backup", config, archive)["outcome"] == "ok"
    assert run_job("restore-test", config, archive)["outcome"] == "ok"
    v = _verdicts(config, archive, uids)
    assert v["old-adult-us"][0] == "delete" and "expired 2020-01-05" in v["old-adult-us"][1]
    assert [n for n, (a, _w) in v.items() if a == "delete"] == ["old-adult-us"]
    dry = run_retention(config, archive, dry_run=True, today=TODAY)
    assert dry["to_delete"] == 1 and dry["deleted_studies"] == 0 and archive.index.counts()["studies"] == 5

    paths = [r[0] for r in archive.index.conn.execute(
        "SELECT i.path FROM instances i JOIN series se ON se.id = i.series_pk JOIN studies s ON s.id = se.study_pk"
        " WHERE s.study_instance_uid = ?", (uids["old-adult-us"],))]
    done = run_retention(config, archive, today=TODAY)
    assert (done["deleted_studies"], done["deleted_instances"]) == (1, 2)
    assert archive.index.counts()["studies"] == 4
    assert not any(archive.store.abspath(p).exists() for p in paths)
    [entry] = archive.index.conn.execute("SELECT who, action, detail FROM audit_log WHERE action='retention delete'")
    assert json.loads(entry["detail"])["study_instance_uid"] == uids["old-adult-us"]


def test_a_study_not_in_the_verified_backup_is_kept_and_the_waiver_deletes_without(box, tmp_path):
    config, archive, uids = box
    run_job("backup", config, archive)
    run_job("restore-test", config, archive)
    # an old study that arrives after the verified backup: not deleted until it is backed up too
    ds = ct_dataset(pydicom.uid.generate_uid(prefix=ORG_ROOT), pydicom.uid.generate_uid(prefix=ORG_ROOT), 1,
                    rows=4, cols=4, patient_id="R9", patient_name="LATE^X")
    ds.StudyDate, ds.Modality = "20000101", "US"
    path = tmp_path / "late.dcm"
    ds.save_as(path, enforce_file_format=True)
    archive.store_file(path)
    verdict = {v["study_instance_uid"]: v for v in plan(config, archive, TODAY)}[ds.StudyInstanceUID]
    assert verdict["action"] == "keep" and "not all of it is in the verified backup" in verdict["why"]
    waived = cfg.from_mapping({"storage": {"data_dir": str(tmp_path / "data")},
                               "retention": {"enabled": True, "rules": [{"modality": "US", "years": 10}],
                                             "require_verified_backup": False}})
    done = run_retention(waived, archive, today=TODAY)
    assert done["deleted_studies"] == 2  # the late one and old-adult-us; never the held or the minor's


def test_scrub_finds_damage_and_repairs_from_the_backup(box):
    config, archive, _uids = box
    assert run_job("backup", config, archive)["outcome"] == "ok"
    rows = archive.index.conn.execute("SELECT path FROM instances ORDER BY id LIMIT 2").fetchall()
    damaged, missing = (archive.store.abspath(r[0]) for r in rows)
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    missing.unlink()
    no_repair = cfg.from_mapping({"storage": {"data_dir": str(config.data_dir)}})
    run = run_job("scrub", no_repair, archive)
    assert run["outcome"] == "problems"
    assert (run["figures"]["damaged"], run["figures"]["missing"], run["figures"]["repaired"]) == (1, 1, 0)
    states = dict(archive.index.conn.execute("SELECT state, count(*) FROM instances GROUP BY state").fetchall())
    assert states == {"ok": 8, "damaged": 1, "missing": 1}
    run = run_job("scrub", config, archive)  # with the backup target: both put back
    assert run["outcome"] == "ok" and run["figures"]["repaired"] == 2
    assert missing.exists() and bytes(data) != damaged.read_bytes()
    states = dict(archive.index.conn.execute("SELECT state, count(*) FROM instances GROUP BY state").fetchall())
    assert states == {"ok": 10}


def test_schedules_keep_crontab_weekdays_and_bad_ones_are_refused():
    """APScheduler 3 counts weekday numbers from Monday; ours keep crontab's (0 and 7 = Sunday)."""
    from datetime import datetime, timezone

    from clinicbox.jobs.scheduler import trigger_for

    monday = datetime(2026, 11, 23, tzinfo=timezone.utc)
    fire = lambda e: trigger_for(e, timezone.utc).get_next_fire_time(None, monday)  # noqa: E731
    assert fire("30 4 * * 0").strftime("%a %H:%M") == "Sun 04:30"
    assert fire("30 4 * * 7").strftime("%a") == "Sun"
    assert fire("0 3 * * 6-7").strftime("%a") == "Sat"
    assert fire("0 3 * * 2").strftime("%a") == "Tue"
    for bad in ("61 3 * * *", "0 25 * * *", "0 3 * * mon-xyz", "0 3 * *"):
        with pytest.raises(cfg.ConfigError) as exc:
            cfg.from_mapping({"jobs": {"backup": bad}})
        assert exc.value.key == "jobs.backup"


def test_a_study_of_several_modalities_keeps_the_longest_time(tmp_path):
    config = cfg.from_mapping({"storage": {"data_dir": str(tmp_path / "data")},
                               "retention": {"enabled": True, "require_verified_backup": False,
                                             "rules": [{"modality": "US", "years": 10},
                                                       {"modality": "*", "years": 30}]}})
    archive = Archive(config.storage)
    archive.open()
    open_jobs(archive)
    try:
        study = pydicom.uid.generate_uid(prefix=ORG_ROOT)
        for n, modality in enumerate(("CT", "US")):
            ds = ct_dataset(study, pydicom.uid.generate_uid(prefix=ORG_ROOT), 1, rows=4, cols=4, patient_id="M1")
            ds.StudyDate, ds.Modality = "20100101", modality
            path = tmp_path / f"{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            archive.store_file(path)
        [verdict] = plan(config, archive, TODAY)
        assert verdict["action"] == "keep" and "30 years" in verdict["why"]
    finally:
        archive.close()


def test_backups_never_lose_an_older_copy(box, tmp_path):
    """A UID stored again with other content after its deletion, and a file the scrub found damaged:
    older backups stay restorable, and pruning keeps the last intact copy of the damaged file."""
    from clinicbox.jobs import backup as bk
    from clinicbox.jobs import restore as rs

    config, archive, uids = box
    target = tmp_path / "target"
    first = bk.run_backup(config.data_dir, target, keep=5)
    row = archive.index.conn.execute("SELECT sop_instance_uid, path, sha256 FROM instances ORDER BY id LIMIT 1").fetchone()
    study = archive.index.conn.execute(
        "SELECT s.study_instance_uid FROM studies s JOIN series se ON se.study_pk = s.id JOIN instances i"
        " ON i.series_pk = se.id WHERE i.sop_instance_uid = ?", (row["sop_instance_uid"],)).fetchone()[0]
    old = pydicom.dcmread(archive.store.abspath(row["path"]))
    archive.delete_study(study)
    old.StudyDescription = "stored again, other content"
    again = tmp_path / "again.dcm"
    old.save_as(again, enforce_file_format=True)
    archive.store_file(again)
    assert archive.index.instance(row["sop_instance_uid"])["path"] == row["path"]  # same place, new bytes
    second = bk.run_backup(config.data_dir, target, keep=5)
    new_sha = archive.index.instance(row["sop_instance_uid"])["sha256"]
    assert (target / bk.ROOT / f"{row['path']}.{new_sha[:16]}").is_file()  # beside the old copy, not over it
    assert bk.dataset_sha256(target / bk.ROOT / row["path"]) == row["sha256"]
    assert rs.verify_backup(target, first.backup_id)["ok"] and rs.verify_backup(target, second.backup_id)["ok"]
    r1 = rs.restore(target, first.backup_id, tmp_path / "r1")
    r2 = rs.restore(target, second.backup_id, tmp_path / "r2")
    assert r1["restored"] and r2["restored"]
    assert pydicom.dcmread(tmp_path / "r1" / row["path"]).get("StudyDescription") != "stored again, other content"
    assert pydicom.dcmread(tmp_path / "r2" / row["path"]).StudyDescription == "stored again, other content"

    # damaged now, and the backups that held it intact get pruned: the copy stays named, the scrub repairs
    victim = archive.index.conn.execute("SELECT path FROM instances ORDER BY id DESC LIMIT 1").fetchone()[0]
    data = bytearray(archive.store.abspath(victim).read_bytes())
    data[-3] ^= 0xFF
    archive.store.abspath(victim).write_bytes(bytes(data))
    no_repair = cfg.from_mapping({"storage": {"data_dir": str(config.data_dir)}})
    assert run_job("scrub", no_repair, archive)["figures"]["damaged"] == 1
    for _ in range(3):
        bk.run_backup(config.data_dir, target, keep=1)
    assert len(bk.list_backups(target)) == 1 and rs.verify_backup(target)["ok"]
    assert run_job("scrub", config, archive)["figures"]["repaired"] == 1


def test_an_instance_that_arrives_after_the_verified_backup_survives_its_studys_deletion(box, tmp_path, monkeypatch):
    """It arrives between the plan and the deletion: the deletion checks again and leaves it."""
    import clinicbox.jobs.retention as retention

    config, archive, uids = box
    run_job("backup", config, archive)
    run_job("restore-test", config, archive)
    late = ct_dataset(uids["old-adult-us"], pydicom.uid.generate_uid(prefix=ORG_ROOT), 9, rows=4, cols=4,
                      patient_id="R1", patient_name="old-adult-us^X")
    late.PatientBirthDate, late.StudyDate, late.Modality = "19500101", "20100105", "US"
    path = tmp_path / "late.dcm"
    late.save_as(path, enforce_file_format=True)
    real_plan = retention.plan

    def plan_then_a_store_arrives(*args, **kwargs):
        verdicts = real_plan(*args, **kwargs)
        archive.store_file(path)  # not in the verified backup
        return verdicts

    monkeypatch.setattr(retention, "plan", plan_then_a_store_arrives)
    done = run_retention(config, archive, today=TODAY)
    assert (done["deleted_studies"], done["deleted_instances"]) == (1, 2)  # the two backed-up ones
    kept = archive.index.instance(late.SOPInstanceUID)
    assert kept is not None and archive.store.abspath(kept["path"]).exists()


# ------------------------------------------------------------------------ review regressions (retention)


def _store(archive, tmp_path, name, pid, birth, day, modality, n=1, study=None):
    study = study or pydicom.uid.generate_uid(prefix=ORG_ROOT)
    series = pydicom.uid.generate_uid(prefix=ORG_ROOT)
    for i in range(n):
        ds = ct_dataset(study, series, i + 1, rows=4, cols=4, patient_id=pid, patient_name=f"{name}^X")
        ds.PatientBirthDate, ds.StudyDate, ds.Modality = birth, day, modality
        path = tmp_path / f"{name}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        archive.store_file(path)
    return study


@pytest.fixture
def bare(tmp_path):
    """An empty archive and a factory of configs over it (no verified backup required)."""
    def make(**retention):
        return cfg.from_mapping({"storage": {"data_dir": str(tmp_path / "data")},
                                 "retention": {"enabled": True, "require_verified_backup": False,
                                               "rules": [{"modality": "US", "years": 10}], **retention}})
    archive = Archive(make().storage)
    archive.open()
    open_jobs(archive)
    yield make, archive
    archive.close()


def test_a_rule_naming_a_modality_beats_the_star_rule(bare, tmp_path):
    make, archive = bare
    config = make(rules=[{"modality": "US", "years": 10}, {"modality": "*", "years": 30}])
    us = _store(archive, tmp_path, "us", "S1", "19600101", "20140101", "US")
    ct = _store(archive, tmp_path, "ct", "S2", "19600101", "20140101", "CT")
    verdicts = {v["study_instance_uid"]: v for v in plan(config, archive, TODAY)}
    assert verdicts[us]["action"] == "delete" and "10 years for US" in verdicts[us]["why"]
    assert verdicts[ct]["action"] == "keep" and "30 years for *" in verdicts[ct]["why"]


def test_a_minor_is_judged_by_the_age_at_the_exam_and_kept_the_extra_years(bare, tmp_path):
    make, archive = bare
    # 9 at the exam (2010), 26 today: kept until 18 + 10 = 2028, though the 10-year rule ended in 2020
    minor = _store(archive, tmp_path, "minor", "K1", "20000601", "20100101", "US")
    # 19 at the exam: an adult; the rule alone counts
    adult = _store(archive, tmp_path, "adult", "K2", "19901231", "20100101", "US")
    # the exam on the 18th birthday: an adult
    birthday = _store(archive, tmp_path, "birthday", "K3", "19920101", "20100101", "US")
    verdicts = {v["study_instance_uid"]: v for v in plan(make(), archive, TODAY)}
    assert verdicts[minor]["action"] == "keep" and "2028-06-01" in verdicts[minor]["why"]
    assert verdicts[adult]["action"] == "delete" and verdicts[birthday]["action"] == "delete"
    # without the extra years the minor's study would have gone in 2018: the setting is what keeps it
    no_extra = {v["study_instance_uid"]: v for v in plan(make(minor_extra_years=0), archive, TODAY)}
    assert no_extra[minor]["action"] == "delete"


def test_a_hold_on_one_study_keeps_that_study_only(bare, tmp_path):
    make, archive = bare
    held = _store(archive, tmp_path, "a", "H1", "19600101", "20100101", "US")
    other = _store(archive, tmp_path, "b", "H1", "19600101", "20100102", "US")
    r = subprocess.run([sys.executable, "-m", "clinicbox", "hold", "add", "--study", held, "--reason", "court",
                        "--data-dir", str(archive.store.root)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    verdicts = {v["study_instance_uid"]: v for v in plan(make(), archive, TODAY)}
    assert verdicts[held]["action"] == "keep" and verdicts[held]["why"] == "legal hold"
    assert verdicts[other]["action"] == "delete"
    done = run_retention(make(), archive, today=TODAY)
    assert done["deleted_studies"] == 1
    assert [r[0] for r in archive.index.conn.execute("SELECT study_instance_uid FROM studies")] == [held]


def test_a_hold_placed_after_the_plan_still_keeps_the_study(bare, tmp_path, monkeypatch):
    make, archive = bare
    study = _store(archive, tmp_path, "late-hold", "H2", "19600101", "20100101", "US", n=2)
    real_plan = retention.plan

    def plan_then_hold(*args, **kwargs):
        verdicts = real_plan(*args, **kwargs)
        archive.writer.call(lambda conn: conn.execute(
            "INSERT INTO legal_holds (kind, value, reason, who, at) VALUES ('patient', 'H2', 'late', 't', 'x')"))
        return verdicts

    monkeypatch.setattr(retention, "plan", plan_then_hold)
    done = run_retention(make(), archive, today=TODAY)
    assert done["to_delete"] == 1 and done["deleted_studies"] == 0
    assert archive.index.counts()["instances"] == 2
    assert archive.index.conn.execute("SELECT count(*) FROM audit_log WHERE action='retention delete'"
                                      ).fetchone()[0] == 0


def test_an_instance_sent_again_while_its_study_is_deleted_keeps_its_file(bare, tmp_path, monkeypatch):
    """Rows go first, files after: the same UID re-sent in between is placed at the same path and
    acknowledged; the deletion must not then remove that file."""
    make, archive = bare
    study = _store(archive, tmp_path, "resent", "H3", "19600101", "20100101", "US")
    row = archive.index.conn.execute("SELECT sop_instance_uid, path FROM instances").fetchone()
    copy = tmp_path / "resent-again.dcm"
    copy.write_bytes(archive.store.abspath(row["path"]).read_bytes())
    real_lock, sent = archive._uid_lock, []

    def lock_after_a_resend(uid):
        if not sent:  # the deletion's rows are committed: now the modality sends it again
            sent.append("sending")
            sent.append(archive.store_file(copy))
        return real_lock(uid)

    monkeypatch.setattr(archive, "_uid_lock", lock_after_a_resend)
    assert archive.delete_study(study) == 1
    assert sent, "the re-send did not happen inside the window"
    again = archive.index.instance(row["sop_instance_uid"])
    assert again is not None and again["path"] == row["path"]
    assert archive.store.abspath(row["path"]).is_file(), "an acknowledged instance lost its file"


def test_the_scrub_does_not_put_back_a_file_whose_row_went(bare, tmp_path):
    make, archive = bare
    study = _store(archive, tmp_path, "gone", "H4", "19600101", "20100101", "US")
    row = archive.index.conn.execute("SELECT id, path, sha256 FROM instances").fetchone()
    intact = tmp_path / "intact.dcm"
    intact.write_bytes(archive.store.abspath(row["path"]).read_bytes())
    archive.delete_study(study)
    assert archive.put_back("instances", row["id"], row["path"], row["sha256"], intact) is False
    assert not archive.store.abspath(row["path"]).exists()


def test_a_study_without_a_birth_date_is_kept_unless_told_the_patient_is_an_adult(bare, tmp_path):
    make, archive = bare
    study = _store(archive, tmp_path, "nobirth", "B1", "", "20100101", "US")
    [verdict] = plan(make(), archive, TODAY)
    assert verdict["action"] == "keep" and "no birth date" in verdict["why"]
    [verdict] = plan(make(without_birth_date="adult"), archive, TODAY)
    assert verdict["action"] == "delete" and verdict["study_instance_uid"] == study
    with pytest.raises(cfg.ConfigError) as exc:
        make(without_birth_date="child")
    assert exc.value.key == "retention.without_birth_date"


def test_a_service_starting_during_retention_does_not_index_the_files_being_deleted(bare, tmp_path, monkeypatch):
    """Start-up repair indexes files it finds without a row; between retention's commit and its unlinks
    those are exactly the files being deleted: it must leave objects/ alone while a job runs."""
    from clinicbox.archive.repair import repair

    make, archive = bare
    _store(archive, tmp_path, "old", "Q1", "19600101", "20100101", "US", n=2)
    committed, go_on = threading.Event(), threading.Event()
    real_lock = archive._uid_lock

    def pause_before_unlinks(uid):
        committed.set()
        assert go_on.wait(30)
        return real_lock(uid)

    monkeypatch.setattr(archive, "_uid_lock", pause_before_unlinks)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("run", run_job("retention", make(), archive)))
    t.start()
    assert committed.wait(30)
    starting = Archive(make().storage)  # the service, started meanwhile
    starting.open()
    try:
        report = repair(starting)
    finally:
        starting.close()
    go_on.set()
    t.join(30)
    assert report.indexed == 0, report
    assert done["run"]["outcome"] == "ok" and done["run"]["figures"]["deleted_instances"] == 2
    assert archive.index.counts()["instances"] == 0
    assert not list(archive.store.iter_objects())
