"""Which stored instances a C-GET / C-MOVE identifier names (PS3.4 C.4.2.2.1, C.4.3.2.1).

Retrieval identifiers carry only unique keys: PatientID (Patient Root, PATIENT level),
StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, each possibly a list of UIDs.
"""

from __future__ import annotations

from clinicbox.archive.index import Index
from clinicbox.archive.matching import where_clause
from clinicbox.archive.query import UNIQUE_KEYS, QueryRefused, hierarchy


def instances_to_retrieve(index: Index, model: str, level: str, identifier: dict) -> list[dict]:
    """The instances to send, in series and instance order; QueryRefused when the identifier is unusable."""
    keys = {}
    for lv in hierarchy(model, level, "retrieve"):
        key = UNIQUE_KEYS[lv]
        value = identifier.get(key)
        if not value:
            raise QueryRefused(0xA900, f"{level} level retrieve needs {key}")
        if lv != level and isinstance(value, list) and len(value) != 1:
            raise QueryRefused(0xA900, f"{key} above the retrieve level must be a single value")
        keys[key] = value
    where, params = where_clause(keys)
    sql = ("SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.path, i.state"
           " FROM instances i JOIN series se ON se.id = i.series_pk JOIN studies s ON s.id = se.study_pk"
           f" JOIN patients p ON p.id = s.patient_pk WHERE {where}"
           " ORDER BY s.id, se.series_number, se.id, i.instance_number, i.id")
    return [dict(r) for r in index.conn.execute(sql, params)]
