"""Logging set-up: stderr (journald under systemd), one logger per room.

Loggers are named after modules (``clinicbox.dicom.store``…), so a room can be raised to DEBUG
alone with ``logging.debug_rooms``.  Patient names and IDs are only ever logged at DEBUG.
"""

from __future__ import annotations

import logging
import os
import sys

from clinicbox.core.config import LoggingSettings


def setup_logging(settings: LoggingSettings) -> None:
    """Configure the root logger once, at the entry point."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journald else \
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    logging.getLogger("clinicbox").setLevel(settings.level)
    for room in settings.debug_rooms:
        logging.getLogger(f"clinicbox.{room}").setLevel(logging.DEBUG)
    logging.getLogger("pynetdicom").setLevel(settings.pynetdicom_level)
