"""``clinicbox console``: the office's terminal console (Textual), a separate process beside the service.

It reads the index directly (SQLite WAL lets readers work beside the service's writer) and acts
through the same room functions the CLI and the service call; closing it never stops the service.
The only package that imports Textual (an import-linter contract says so).
"""
