"""Shared test configuration.

Peers are real: DCMTK tools are called by absolute path (/usr/bin/...) because the
virtualenv's pynetdicom installs scripts with the same names.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline by design: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# DCMTK and Orthanc keep Nagle's algorithm on unless told otherwise.
os.environ.setdefault("TCP_NODELAY", "1")

DCMTK_BIN = Path("/usr/bin")

# Ledger database fixtures (`ledger_url` on SQLite and PostgreSQL, `pg_schema_url`);
# the tiny random Gemma 3 (`tiny_gemma_dir`, `tiny_adapter_dir`) for VLM tests.
pytest_plugins = ["tests.support.ledger_db", "tests.support.tiny_gemma"]


@pytest.fixture(scope="session")
def dcmtk() -> Path:
    """Directory of the DCMTK command-line tools (fails, never skips, if missing)."""
    for tool in ("storescu", "echoscu", "dsrdump", "dcmdump"):
        if not (DCMTK_BIN / tool).exists():
            pytest.fail(f"DCMTK tool {tool} missing: run `make system-deps`")
    return DCMTK_BIN
