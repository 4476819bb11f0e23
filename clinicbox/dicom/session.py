"""Per-association bookkeeping: who called, what was accepted, what was stored; one log line at the end."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from clinicbox.archive.ingest import StoreOutcome, StoreResult

log = logging.getLogger(__name__)

_ATTR = "_clinicbox_session"


@dataclass
class Session:
    calling_ae: str = ""
    called_ae: str = ""
    host: str = ""
    port: int = 0
    started: float = field(default_factory=time.monotonic)
    contexts: int = 0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    stores_in_progress: int = 0

    @property
    def who(self) -> str:
        return f"{self.calling_ae or '?'}@{self.host}:{self.port}"

    def count(self, result: StoreResult) -> None:
        if result.outcome in (StoreOutcome.STORED, StoreOutcome.REPLACED):
            self.stored += 1
            self.bytes += result.size
        else:
            self.duplicates += 1

    def summary(self, how: str) -> str:
        secs = time.monotonic() - self.started
        return (f"association {how}: {self.who} -> {self.called_ae or '?'}, {self.contexts} contexts accepted, "
                f"{self.stored} stored, {self.duplicates} duplicate, {self.failed} failed, "
                f"{self.bytes / 1e6:.1f} MB in {secs:.2f} s")


def session_of(assoc) -> Session:
    s = getattr(assoc, _ATTR, None)
    if s is None:
        s = Session()
        setattr(assoc, _ATTR, s)
    return s
