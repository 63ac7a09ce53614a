"""Changing the node's configuration file at run time: list, add, change, remove.

The truth stays where the admin already keeps it: the TOML file ``qcnode serve`` was
started with. Every change is made to that file — comments, order and formatting kept
(tomlkit) — validated exactly as ``qcnode config check`` validates (the whole new file,
environment overrides included), written atomically (temporary file, fsync, rename), and
recorded in an audit trail (``<home>/audit/config.jsonl``: who, when, what, before,
after). A running node then takes it like a SIGHUP reload (:mod:`node.reload`): senders,
destinations and rules apply to the next association, without dropping open ones.

Why the file rather than the ledger database: one node is one file an admin can read,
diff, back up and put under configuration management, and a hand edit + SIGHUP and an
API call stay the same operation. A site with several listeners shares the file the way
it shares any configuration (the same file on each host); the ledger holds what the
node did, not how it is configured.

Entries of ``[[senders]]`` are named by index (they have no name); ``[[destinations]]``
and ``[[rules]]`` by their ``name``.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import AoT

from node.config import ConfigError, Settings, load_settings
from node.config_errors import Problem

SECTIONS = ("senders", "destinations", "rules")
NAMED = ("destinations", "rules")


class NotFound(LookupError):
    """No entry by that name or index."""


@dataclass(frozen=True)
class Change:
    """One applied change, as the audit trail records it."""

    at: str
    who: str
    action: str
    path: str
    before: Any
    after: Any


def _plain(value: Any) -> Any:
    """A tomlkit value as plain JSON-ready Python."""
    return json.loads(json.dumps(value, default=str))


class ConfigStore:
    """Read-modify-validate-write of one configuration file, with an audit trail."""

    def __init__(self, path: Path, audit: Path) -> None:
        self.path = path
        self.audit = audit

    # Reading ------------------------------------------------------------------------
    def entries(self, section: str) -> list[dict[str, Any]]:
        """The entries of ``[[section]]`` as written in the file."""
        _check_section(section)
        doc = tomlkit.parse(self.path.read_text(encoding="utf-8"))
        return [_plain(e) for e in doc.get(section, [])]

    def value(self, section: str, key: str) -> Any:
        """``[section] key`` as written in the file (None when not set)."""
        doc = tomlkit.parse(self.path.read_text(encoding="utf-8"))
        table = doc.get(section)
        return None if table is None else _plain(table.get(key))

    # Changing -----------------------------------------------------------------------
    def add(self, section: str, entry: dict[str, Any], who: str) -> Settings:
        """Append an entry to ``[[section]]``."""
        _check_section(section)

        def edit(doc: tomlkit.TOMLDocument) -> tuple[str, Any, Any]:
            array = doc.get(section)
            if array is None:
                array = AoT([])
                doc.append(section, array)
            array.append(_table(entry))
            return f"{section}[{len(array) - 1}]", None, entry
        return self._change(edit, "add", who)

    def replace(self, section: str, ref: str, entry: dict[str, Any], who: str) -> Settings:
        """Replace the entry ``ref`` (a name, or an index for senders)."""
        def edit(doc: tomlkit.TOMLDocument) -> tuple[str, Any, Any]:
            array, index = _find(doc, section, ref)
            before = _plain(array[index])
            array[index] = _table(entry)
            return f"{section}[{index}]", before, entry
        return self._change(edit, "change", who)

    def remove(self, section: str, ref: str, who: str) -> Settings:
        """Remove the entry ``ref``."""
        def edit(doc: tomlkit.TOMLDocument) -> tuple[str, Any, Any]:
            array, index = _find(doc, section, ref)
            before = _plain(array[index])
            del array[index]
            return f"{section}[{index}]", before, None
        return self._change(edit, "remove", who)

    def set_value(self, section: str, key: str, value: Any, who: str) -> Settings:
        """Set ``[section] key`` (e.g. ``node.ae_title``)."""
        def edit(doc: tomlkit.TOMLDocument) -> tuple[str, Any, Any]:
            table = doc.get(section)
            if table is None:
                table = tomlkit.table()
                doc.append(section, table)
            before = _plain(table.get(key))
            table[key] = value
            return f"{section}.{key}", before, value
        return self._change(edit, "change", who)

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` audit records, newest first."""
        if not self.audit.exists():
            return []
        lines = self.audit.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in reversed(lines[-limit:])]

    def _change(self, edit: Callable[[tomlkit.TOMLDocument], tuple[str, Any, Any]],
                action: str, who: str) -> Settings:
        with self._locked():
            doc = tomlkit.parse(self.path.read_text(encoding="utf-8"))
            path, before, after = edit(doc)
            text = tomlkit.dumps(doc)
            settings = self._validate(text)
            _write_atomically(self.path, text)
            change = Change(dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), who,
                            action, path, before, after)
            self._record(change)
        return settings

    def _validate(self, text: str) -> Settings:
        """The settings the new text gives, or ConfigError with every problem."""
        with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=self.path.parent,
                                         delete=False, encoding="utf-8") as fh:
            fh.write(text)
            candidate = Path(fh.name)
        try:
            return load_settings(candidate)
        except ConfigError as exc:
            raise ConfigError(str(self.path), exc.issues) from None
        finally:
            candidate.unlink(missing_ok=True)

    def _record(self, change: Change) -> None:
        self.audit.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(change.__dict__, ensure_ascii=False)
        with self.audit.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (the API's threads, ``qcnode config`` in a shell)."""
        lock = self.path.with_name(f".{self.path.name}.lock")
        with lock.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _check_section(section: str) -> None:
    if section not in SECTIONS:
        raise NotFound(f"no section {section!r}; one of {', '.join(SECTIONS)}")


def _table(entry: dict[str, Any]) -> Any:
    table = tomlkit.table()
    for key, value in entry.items():
        if value is not None:
            table[key] = value
    return table


def _find(doc: tomlkit.TOMLDocument, section: str, ref: str) -> tuple[Any, int]:
    _check_section(section)
    array = doc.get(section) or []
    if section in NAMED:
        for index, entry in enumerate(array):
            if str(entry.get("name")) == ref:
                return array, index
        raise NotFound(f"no {section} entry named {ref!r}")
    if ref.isdigit() and int(ref) < len(array):
        return array, int(ref)
    raise NotFound(f"no {section} entry {ref!r} (senders are numbered from 0)")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.new")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def problems_of(exc: ConfigError) -> list[dict[str, str]]:
    """A ConfigError's problems as JSON (key and message, as ``config check`` says them)."""
    return [{"key": key, "message": message} for key, message in exc.problems]


__all__ = ["SECTIONS", "ConfigStore", "NotFound", "Problem", "problems_of"]
