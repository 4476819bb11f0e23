"""Configuration: defaults documented, bad values named, exit code 2 at start-up."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import fields

import pytest

from clinicbox.core import config as cfg
from tests.support.peers import REPO


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "clinicbox", *args], capture_output=True, text=True, cwd=REPO,
                          env=env)


def test_show_default_is_valid_toml_with_every_key_commented():
    text = cfg.default_toml()
    data = tomllib.loads(text)
    assert cfg.from_mapping(data) == cfg.Config()
    for section in ("server", "storage", "query", "logging"):
        for f in fields(type(getattr(cfg.Config(), section))):
            assert f.name in data[section]
            assert f.metadata["doc"], f"{section}.{f.name} has no explanation"
            line = next(i for i, l in enumerate(text.splitlines()) if l.startswith(f"{f.name} = "))
            assert text.splitlines()[line - 1].startswith("# ")


def test_defaults_match_the_issue():
    c = cfg.Config()
    assert (c.server.port, c.server.ae_title, c.storage.data_dir) == (11112, "CLINICBOX", "./clinicbox-data")
    assert c.server.accept_unknown_sop_classes is True
    assert c.storage.duplicate_policy == "keep-first"


@pytest.mark.parametrize("text, key", [
    ("[server]\nport = 'eleven'\n", "server.port"),
    ("[server]\nport = 70000\n", "server.port"),
    ("[server]\nport = -1\n", "server.port"),
    ("[server]\nae_title = 'THIS_TITLE_IS_FAR_TOO_LONG'\n", "server.ae_title"),
    ("[server]\nprot = 104\n", "server.prot"),
    ("[storage]\nduplicate_policy = 'newest'\n", "storage.duplicate_policy"),
    ("[stroage]\n", "stroage"),
    ("[server]\nallowed_calling_ae_titles = [1]\n", "server.allowed_calling_ae_titles[0]"),
    ("[jobs]\ntimezone = 'Europe/Berlinn'\n", "jobs.timezone"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(path)
    assert exc.value.key == key


def test_cli_config_check_and_show_default(tmp_path):
    r = run_cli("config", "show-default")
    assert r.returncode == 0 and "[server]" in r.stdout
    good = tmp_path / "good.toml"
    good.write_text(r.stdout)
    assert run_cli("config", "check", str(good)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = -1\n")
    r = run_cli("config", "check", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, "one clear line, no traceback"
    assert "server.port" in r.stderr


def test_serve_with_bad_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage]\nindex_synchronous = 'sometimes'\n")
    r = run_cli("serve", "--config", str(bad), "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2
    assert "storage.index_synchronous" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", "--data-dir", str(tmp_path / "d"), "--ae-title", "BAD\\TITLE")
    assert r.returncode == 2 and "server.ae_title" in r.stderr


def test_env_config_is_used(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[logging]\nlevel = 'LOUD'\n")
    r = run_cli("studies", "--data-dir", str(tmp_path / "d"), env={"CLINICBOX_CONFIG": str(bad), "PATH": "/usr/bin"})
    assert r.returncode == 2 and "logging.level" in r.stderr


def test_every_subcommand_has_help():
    from clinicbox.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.description or sub._name_parser_map[name].format_help()
        assert run_cli(name, "--help").returncode == 0
    readme = (REPO / "README.md").read_text()
    for name in sub.choices:
        assert f"clinicbox {name}" in readme, f"README does not mention `clinicbox {name}`"
