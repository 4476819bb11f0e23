"""Retention: studies past their keeping time go, never one under legal hold or not safely backed up.

Rules (``[retention]`` in the config) give a keeping time in years per modality, ``*`` for
modalities no rule names (a study of several modalities keeps the longest of their times),
counted from the study date (or, without one, from when ClinicBox received it).  A study of a
patient who was a minor at the exam is kept at least until the patient is ``minor_age`` +
``minor_extra_years`` years old; without a birth date, a study past its time is kept unless
``without_birth_date = "adult"``.  A legal hold on the patient or the study keeps it whatever the
rules say.  A study is deleted only if every one of its files is in the backup whose restore was
last verified (restore-test), unless ``require_verified_backup = false`` (logged loudly).  A dry
run lists what would go and why; every deletion is written to the audit log.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import date
from pathlib import Path

from clinicbox.archive import index as idx
from clinicbox.archive.ingest import Archive
from clinicbox.core.config import Config
from clinicbox.jobs import backup

log = logging.getLogger(__name__)


def _date(text: str) -> date | None:
    text = (text or "").strip()[:10].replace("-", "")
    try:
        return date(int(text[0:4]), int(text[4:6]), int(text[6:8])) if len(text) >= 8 else None
    except ValueError:
        return None


def _add_years(d: date, years: int) -> date:
    try:
        return d.replace(year=d.year + years)
    except ValueError:  # 29 February
        return d.replace(year=d.year + years, day=28)


audit = idx.audit


def holds(conn: sqlite3.Connection) -> tuple[set[str], set[str]]:
    patients, studies = set(), set()
    for kind, value in conn.execute("SELECT kind, value FROM legal_holds"):
        (patients if kind == "patient" else studies).add(value)
    return patients, studies


def _verified_backup_objects(config: Config, conn: sqlite3.Connection) -> dict[str, str] | None:
    """path -> sha256 of the backup last proven by a restore test, or None when there is none."""
    row = conn.execute("SELECT figures FROM job_runs WHERE job='restore-test' AND outcome='ok'"
                       " ORDER BY id DESC LIMIT 1").fetchone()
    if row is None or not config.backup.target:
        return None
    backup_id = json.loads(row[0] or "{}").get("backup")
    try:
        bdir = backup.find_backup(Path(config.backup.target), backup_id)
        manifest = backup.read_manifest(bdir)
    except (backup.BackupError, OSError, ValueError):
        return None
    return {o["path"]: o["sha256"] for o in manifest["objects"]}


def _rule_for(rules, modalities: list[str]) -> dict | None:
    """The rule that keeps a study longest, taking for each of its modalities the rule naming it, else
    ``*`` (with US 10 years and ``*`` 30, ultrasound is kept 10 years, a study of CT and US 30).  A
    study without a modality is covered by ``*``; None when no rule covers it."""
    star = [x for x in rules if x.get("modality", "*") == "*"]
    chosen = []
    for modality in modalities or [None]:
        named = [x for x in rules if modality is not None and x.get("modality") == modality]
        chosen += named or star
    return max(chosen, key=lambda x: int(x["years"])) if chosen else None


def _hold_now(study_instance_uid: str):
    """The last-moment check inside the delete's transaction: a legal hold placed since the plan."""
    def keep_if(conn: sqlite3.Connection) -> str | None:
        row = conn.execute(
            "SELECT 1 FROM legal_holds WHERE (kind='study' AND value=?) OR (kind='patient' AND value IN ("
            " SELECT p.patient_id FROM studies s JOIN patients p ON p.id = s.patient_pk"
            " WHERE s.study_instance_uid=?))", (study_instance_uid, study_instance_uid)).fetchone()
        return "legal hold" if row else None
    return keep_if


def plan(config: Config, archive: Archive, today: date | None = None) -> list[dict]:
    """Every study with its verdict: keep (and why) or delete (and why)."""
    today = today or date.today()
    r = config.retention
    conn = archive.index.conn
    held_patients, held_studies = holds(conn)
    backed_up = _verified_backup_objects(config, conn) if r.require_verified_backup else {}
    out = []
    for s in conn.execute(
            "SELECT s.id, s.study_instance_uid, s.study_date, s.created_at, s.modalities_in_study, s.num_instances,"
            " p.patient_id, p.patient_birth_date FROM studies s JOIN patients p ON p.id = s.patient_pk"):
        mods = [m for m in (s["modalities_in_study"] or "").split("\\") if m]
        rule = _rule_for(r.rules, mods)
        basis = _date(s["study_date"]) or _date(s["created_at"])
        item = {"study_instance_uid": s["study_instance_uid"], "study_date": s["study_date"], "modalities": mods,
                "instances": s["num_instances"]}
        if rule is None or basis is None:
            out.append(item | {"action": "keep", "why": "no retention rule applies" if rule is None else "no date"})
            continue
        expires = _add_years(basis, int(rule["years"]))
        why = f"{rule['years']} years for {rule.get('modality', '*')} from {basis.isoformat()}"
        birth = _date(s["patient_birth_date"])
        if birth and basis < _add_years(birth, r.minor_age):
            adult_plus = _add_years(birth, r.minor_age + r.minor_extra_years)
            if adult_plus > expires:
                expires, why = adult_plus, (f"minor at the exam: kept until age {r.minor_age} + "
                                            f"{r.minor_extra_years} years ({adult_plus.isoformat()})")
        item["expires"] = expires.isoformat()
        if s["patient_id"] in held_patients or s["study_instance_uid"] in held_studies:
            out.append(item | {"action": "keep", "why": "legal hold"})
        elif expires > today:
            out.append(item | {"action": "keep", "why": why})
        elif birth is None and r.without_birth_date == "keep":
            out.append(item | {"action": "keep", "why": "expired, but no birth date: kept in case the patient "
                                                        "was a minor (retention.without_birth_date)"})
        elif r.require_verified_backup:
            if backed_up is None:
                out.append(item | {"action": "keep", "why": "expired, but no verified backup (restore test) yet"})
                continue
            files = conn.execute("SELECT i.path, i.sha256 FROM instances i JOIN series se ON se.id = i.series_pk"
                                 " WHERE se.study_pk = ?", (s["id"],)).fetchall()
            if all(backed_up.get(f["path"]) == f["sha256"] for f in files):
                out.append(item | {"action": "delete", "why": f"expired {expires.isoformat()} ({why})"})
            else:
                out.append(item | {"action": "keep", "why": "expired, but not all of it is in the verified backup"})
        else:
            out.append(item | {"action": "delete", "why": f"expired {expires.isoformat()} ({why}); "
                                                          "verified backup NOT required"})
    return out


def _expire_trash(config: Config, archive: Archive, *, dry_run: bool, who: str) -> dict:
    """Rejected reconciliation items past reconcile.trash_days and rendered print PDFs past print.keep_days
    go, whether or not retention (of studies) is enabled."""
    # imported here: they bring pydicom and numpy, which every other job command would pay for at start-up
    from clinicbox.printing.relay import PrintRelay
    from clinicbox.reconcile.queue import Reconciler

    reconciler = Reconciler(archive, config.intake, config.reconcile)
    reconciler.open()
    relay = PrintRelay(archive, config.print)
    relay.open()
    if dry_run:
        return {"trash_items_due": reconciler.expire_rejected(dry_run=True)["expired_items"],
                **relay.expire_scratch(dry_run=True)}
    return reconciler.expire_rejected(who=who) | relay.expire_scratch()


def run_retention(config: Config, archive: Archive, *, dry_run: bool = False, who: str = "retention job",
                  today: date | None = None) -> dict:
    trash = _expire_trash(config, archive, dry_run=dry_run, who=who)
    if not config.retention.enabled and not dry_run:
        return {"enabled": False, "deleted_studies": 0, "deleted_instances": 0, **trash}
    if not config.retention.require_verified_backup:
        log.warning("retention.require_verified_backup = false: studies are deleted WITHOUT a verified backup")
    verdicts = plan(config, archive, today)
    doomed = [v for v in verdicts if v["action"] == "delete"]
    figures = {"studies": len(verdicts), "to_delete": len(doomed), "dry_run": dry_run, "deleted_studies": 0,
               "deleted_instances": 0, **trash}
    if dry_run:
        figures["plan"] = verdicts
        return figures
    backed_up = (_verified_backup_objects(config, archive.index.conn) or {}) \
        if config.retention.require_verified_backup else None
    for v in doomed:
        # checked again inside the delete's transaction: what arrived since the plan, or is not in the
        # backup, stays; a legal hold placed since the plan keeps the study; the audit record commits
        # with the deletion
        def record(conn, n, v=v):
            audit(conn, who, "retention delete", {"study_instance_uid": v["study_instance_uid"], "instances": n,
                                                  "why": v["why"]})

        n = archive.delete_study(v["study_instance_uid"], only=backed_up, keep_if=_hold_now(v["study_instance_uid"]),
                                 write_extra=record)
        if isinstance(n, str):
            log.info("retention: a study was kept at the last moment: %s", n)
            continue
        if n:
            figures["deleted_studies"] += 1
            figures["deleted_instances"] += n
    log.info("retention: %d studies checked, %d deleted (%d instances)", len(verdicts), figures["deleted_studies"],
             figures["deleted_instances"])
    return figures
