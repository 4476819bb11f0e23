"""The rooms depend one way, and the service never loads the console toolkit."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.support.peers import REPO


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(REPO / ".venv" / "bin")) or shutil.which("lint-imports")
    assert lint, "import-linter is part of the test extra"
    r = subprocess.run([lint], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_serve_never_imports_textual(tmp_path):
    code = (
        "import sys, threading\n"
        "from clinicbox.core.config import Config\n"
        "from clinicbox.app import make_appliance\n"
        "import clinicbox.cli\n"
        f"a = make_appliance(Config().with_overrides(data_dir={str(tmp_path / 'd')!r}, port=0))\n"
        "a.start(); a.stop()\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_only_the_console_command_loads_textual(tmp_path):
    code = (
        "import sys\n"
        "from clinicbox.cli import main\n"
        f"for argv in (['status', '--data-dir', {str(tmp_path / 'd')!r}], ['jobs', 'list', '--data-dir', "
        f"{str(tmp_path / 'd')!r}]):\n"
        "    assert main(argv) == 0\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        "assert not bad, bad\n"
        "import clinicbox.console.app\n"
        "assert 'textual' in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
