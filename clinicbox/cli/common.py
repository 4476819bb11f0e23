"""What every ``clinicbox`` subcommand shares: common flags, config loading, opening the rooms."""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Iterable
from pathlib import Path  # noqa: F401  (used by the subcommand modules' type hints)

from clinicbox.core import config as cfg

EXIT_CONFIG = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML configuration file (default: ${cfg.ENV_CONFIG}, else built-in defaults)")
    parser.add_argument("--data-dir", metavar="DIR", help="data folder (overrides storage.data_dir)")


def _load_config(args) -> cfg.Config:
    config = cfg.load(getattr(args, "config", None))
    return config.with_overrides(data_dir=getattr(args, "data_dir", None), port=getattr(args, "port", None),
                                 ae_title=getattr(args, "ae_title", None))


def _open_archive(config: cfg.Config):
    from clinicbox.archive.ingest import Archive

    archive = Archive(config.storage)
    archive.open()
    return archive


def _who(args) -> str:
    import getpass

    if getattr(args, "by", ""):
        return args.by
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except Exception:
        return "cli"


def print_rows(rows: list, *, as_json: bool, empty: str, line: Callable[[dict], str | Iterable[str]],
               header: str = "", json_rows: list | None = None) -> int:
    """A list command's output: the rows as JSON (``json_rows`` when they differ from ``rows``), else one
    line saying there is nothing, else ``header`` and each row's line (or lines); exit status 0."""
    if as_json:
        print(json.dumps(rows if json_rows is None else json_rows, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print(empty)
        return 0
    if header:
        print(header)
    for row in rows:
        out = line(row)
        print(out if isinstance(out, str) else "\n".join(out))
    return 0
