"""A private CUPS scheduler with a cups-pdf queue, for print relay tests and benchmarks.

``cupsd`` runs in the foreground on a free loopback port with its config, spool, state and logs in
a temp folder, and is stopped by PID.  cups-pdf reads its settings from ``/etc/cups`` only: the
queue's device URI ``cups-pdf:/<NAME>`` makes it read ``/etc/cups/cups-pdf-<NAME>.conf``, which
points its output into the temp folder (names unique per test; the file is removed on stop).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.support.peers import free_port, wait_for_port

CUPSD, LPADMIN, LPSTAT = "/usr/sbin/cupsd", "/usr/sbin/lpadmin", "/usr/bin/lpstat"
CUPS_PDF_PPD = Path("/usr/share/ppd/cups-pdf/CUPS-PDF_opt.ppd")


def require_cups() -> None:
    missing = [p for p in (CUPSD, LPADMIN, "/usr/lib/cups/backend/cups-pdf", str(CUPS_PDF_PPD), "/usr/bin/pdftoppm")
               if not Path(p).exists()]
    if missing:
        pytest.fail(f"CUPS with cups-pdf and poppler-utils needed ({', '.join(missing)} missing): "
                    "apt-get install -y cups printer-driver-cups-pdf poppler-utils")


class Cups:
    """``Cups()`` makes its own folder under the system temp dir: CUPS runs its filters as user lp,
    which must reach the TempDir (pytest's tmp_path is private to root)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="clinicbox-cups-"))
        self.port = free_port()
        self.server = f"127.0.0.1:{self.port}"
        self.queue = f"CBTEST{uuid.uuid4().hex[:8].upper()}"
        self.pdf_dir = self.folder / "pdf"
        self._queue_conf = Path(f"/etc/cups/cups-pdf-{self.queue}.conf")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Cups":
        require_cups()
        f = self.folder
        for d in ("etc", "spool", "cache", "state", "log", "pdf"):
            (f / d).mkdir(parents=True, exist_ok=True)
        os.chmod(f, 0o755)
        (f / "tmp").mkdir(mode=0o1777, exist_ok=True)
        os.chmod(f / "tmp", 0o1777)
        os.chmod(self.pdf_dir, 0o777)
        (f / "etc" / "cupsd.conf").write_text(
            f"Listen 127.0.0.1:{self.port}\nLogLevel debug\nWebInterface No\nBrowsing No\n"
            "<Location />\n  Order allow,deny\n  Allow all\n</Location>\n"
            "<Policy default>\n  <Limit All>\n    Order deny,allow\n  </Limit>\n</Policy>\n")
        (f / "etc" / "cups-files.conf").write_text(
            f"ServerRoot {f}/etc\nRequestRoot {f}/spool\nTempDir {f}/tmp\nCacheDir {f}/cache\nStateDir {f}/state\n"
            f"ServerBin /usr/lib/cups\nDataDir /usr/share/cups\nAccessLog {f}/log/access_log\n"
            f"ErrorLog {f}/log/error_log\nPageLog {f}/log/page_log\nSystemGroup root\n")
        self._queue_conf.write_text(f"Out {self.pdf_dir}\nAnonDirName {self.pdf_dir}\nLabel 1\n")
        self.run()
        subprocess.run([LPADMIN, "-h", self.server, "-p", self.queue, "-E", "-v", f"cups-pdf:/{self.queue}", "-P",
                        str(CUPS_PDF_PPD)], check=True, capture_output=True, timeout=30)
        return self

    def run(self) -> None:
        """Start (or start again) the scheduler with the same configuration and state."""
        self.proc = subprocess.Popen([CUPSD, "-f", "-c", str(self.folder / "etc" / "cupsd.conf"), "-s",
                                      str(self.folder / "etc" / "cups-files.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 20, self.proc)

    def halt(self) -> None:
        """Stop the scheduler (as when CUPS is stopped or the print server is off)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.halt()
        self._queue_conf.unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def pdfs(self) -> list[Path]:
        return sorted(self.pdf_dir.glob("*.pdf"))

    def wait_for_pdfs(self, count: int, timeout: float = 60.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.pdfs()
            if len(found) >= count:
                time.sleep(0.3)  # cups-pdf writes, then renames into place
                return self.pdfs()
            time.sleep(0.2)
        raise AssertionError(f"cups-pdf wrote {len(self.pdfs())} of {count} PDFs in {timeout} s:\n"
                             + self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        log = self.folder / "log" / "error_log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join(l for l in text.splitlines() if " E " in l or "[Job" in l and "stopped" in l)[-4000:] \
            or "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "Cups":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def pdf_pages(pdf: Path) -> list[tuple[float, float]]:
    """(width, height) in points of every page, by poppler's pdfinfo."""
    out = subprocess.run([shutil.which("pdfinfo") or "/usr/bin/pdfinfo", "-f", "1", "-l", "999", str(pdf)],
                         capture_output=True, text=True, check=True).stdout
    sizes = []
    for line in out.splitlines():
        if line.startswith("Page") and "size:" in line:
            parts = line.split("size:")[1].split()
            sizes.append((float(parts[0]), float(parts[2])))
    return sizes
