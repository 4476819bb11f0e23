"""An order's history: every status change and staff action, with who and when (append-only)."""

from __future__ import annotations

import sqlite3

from clinicbox.archive import index as idx


def record_event(conn: sqlite3.Connection, order_pk: int | None, who: str, what: str, detail: str = "") -> None:
    conn.execute("INSERT INTO order_events (order_pk, at, who, what, detail) VALUES (?,?,?,?,?)",
                 (order_pk, idx.utcnow(), who, what, detail))


def set_order_status(conn: sqlite3.Connection, order_pk: int, status: str, who: str, detail: str = "") -> None:
    row = conn.execute("SELECT status FROM orders WHERE id=?", (order_pk,)).fetchone()
    if row is None or row["status"] == status:
        return
    conn.execute("UPDATE orders SET status=?, updated_at=? WHERE id=?", (status, idx.utcnow(), order_pk))
    record_event(conn, order_pk, who, f"{row['status']} -> {status}", detail)
