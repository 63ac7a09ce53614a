"""Run ``qcnode serve`` as a real subprocess on a free port with its own home.

:func:`running_node` writes a TOML config, starts the node, waits for the line
``listening on HOST:PORT as AE_TITLE`` on stdout (with a deadline) and stops it with
SIGTERM on exit. The node's stderr (its JSON logs) goes to ``<tmp>/node.log``.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 90.0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]],
                 tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> Path:
    """Write ``[section]`` tables and ``[[array]]`` tables as TOML."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for name, entries in (tables or {}).items():
        for entry in entries:
            lines.append(f"[[{name}]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class RunningNode:
    """A started ``qcnode serve``."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    ae_title: str
    home: Path
    config: Path
    log: Path
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{(self.home / 'ledger.sqlite3').resolve()}"

    @property
    def spool(self) -> Path:
        return self.home / "spool"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        self.proc.kill()
        self.proc.wait(30)


def default_sections(home: Path, port: int, ae_title: str = "QCNODE") -> dict[str, dict[str, Any]]:
    """A config for tests: free port, fast completion, no disk watermark, DEBUG logs."""
    return {
        "node": {"ae_title": ae_title, "host": "127.0.0.1", "port": port, "home": str(home),
                 "acse_timeout": 2.0},
        "completion": {"quiet_seconds": 1.0, "poll_seconds": 0.2},
        # A small receive journal: tests start many nodes, each writes its journal once.
        "spool": {"min_free_bytes": 0, "min_free_percent": 0.0,
                  "journal_segment_bytes": 1 << 20, "journal_segments": 2},
        "logging": {"level": "DEBUG", "json": "always"},
        "web": {"port": 0},  # any free port: tests start many nodes
    }


def start_node(config: Path, home: Path, log: Path, *, env: Mapping[str, str] | None = None,
               timeout: float = READY_TIMEOUT) -> RunningNode:
    """Start ``qcnode serve --config config``; wait for its ``listening on`` line."""
    with log.open("ab") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=log_fh, text=True,
            env={**os.environ, **(env or {})},
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def _pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=_pump, daemon=True).start()
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            raise TimeoutError(
                f"qcnode serve did not report listening within {timeout}s"
            ) from None
        if line is None:
            proc.wait(10)
            raise RuntimeError(
                f"qcnode serve exited ({proc.returncode}) before listening:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        seen.append(line)
        if line.startswith("listening on "):
            address, _, ae_title = line[len("listening on "):].partition(" as ")
            host, _, port = address.rpartition(":")
            return RunningNode(proc, host, int(port), ae_title, home, config, log, seen)


@contextmanager
def running_node(tmp: Path, *, extra: Mapping[str, Mapping[str, Any]] | None = None,
                 tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 port: int | None = None) -> Iterator[RunningNode]:
    """A node in ``tmp`` (config, home, log), stopped with SIGTERM afterwards."""
    home = tmp / "home"
    sections = default_sections(home, port or free_port())
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    config = write_config(tmp / "qcnode.toml", sections, tables or {})
    node = start_node(config, home, tmp / "node.log")
    try:
        yield node
    finally:
        if node.proc.poll() is None:
            node.stop()
