"""The composition root: builds the appliance from a config, starts and stops it in order.

CLI, systemd and tests all go through :func:`make_appliance`.  Start order: data dir lock ->
archive (index, migrations, writer) -> orders
(their migrations) -> jobs -> start-up repair -> DICOM service -> job schedule -> READY.  Stop order
is the reverse, so every store that got Success is committed before the process exits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from clinicbox.archive.ingest import Archive
from clinicbox.archive.repair import repair
from clinicbox.core.config import Config
from clinicbox.dicom.printscu import PrintForwarder
from clinicbox.dicom.server import DicomServer
from clinicbox.jobs.runner import open_jobs
from clinicbox.jobs.scheduler import Scheduler
from clinicbox.orders.book import OrderBook
from clinicbox.printing.relay import PrintRelay
from clinicbox.reconcile.queue import Reconciler

log = logging.getLogger(__name__)


class DataDirBusy(RuntimeError):
    """Another ``clinicbox serve`` holds this data dir."""


def sd_notify(message: str) -> None:
    """Tell systemd our state (READY=1, STOPPING=1) when run as a Type=notify service."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


class Appliance:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.archive = Archive(config.storage)
        self.orders = OrderBook(self.archive)
        self.reconciler = Reconciler(self.archive, config.intake, config.reconcile)
        self.printing = PrintRelay(self.archive, config.print)
        self.printing.forwarders["dicom"] = PrintForwarder(self.archive.index, config.server.ae_title)
        self.dicom = DicomServer(config.server, self.archive, self.orders, config.query, config.worklist,
                                 self.printing, config.print)
        self.scheduler = Scheduler(config, self.archive)
        self._stop = threading.Event()
        self._lock_file = None

    def start(self) -> None:
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(data_dir / "serve.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DataDirBusy(f"another clinicbox serve is using {data_dir}") from None
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()
        try:
            self.archive.open()
            self.orders.open()
            self.reconciler.open()
            self.reconciler.install()
            self.printing.open()
            open_jobs(self.archive)
            repair(self.archive)
            self.archive.disk_state()
            self.dicom.start()
            self.printing.start()
            self.scheduler.start()
        except BaseException:
            self.archive.close()
            self._lock_file.close()
            self._lock_file = None
            raise
        log.info("ClinicBox serving data dir %s", Path(data_dir).resolve())
        sd_notify("READY=1")

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        self.scheduler.stop()
        self.dicom.stop()
        self.printing.stop()
        self.archive.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        log.info("ClinicBox stopped")

    def request_stop(self, *_args) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop in order."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            log.info("stop requested: finishing stores in flight")
            self.stop()


def make_appliance(config: Config) -> Appliance:
    return Appliance(config)
