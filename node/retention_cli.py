"""``qcnode retention [dry-run | run] [--json]``: what retention deletes, for admins.

``dry-run`` (the default) lists what a sweep would delete now and changes nothing; it
is safe while the node runs. ``run`` deletes, but only while no node runs on the home
(it takes ``<home>/node.lock`` exclusively; a running node sweeps by itself every
``[retention] sweep_seconds``) and only when the receive journal holds no record
still to be applied (the next start would replay it). Output names series by UID.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from node.config import ConfigError, load_settings
from node.ledger import Ledger
from node.logs import configure_logging
from node.store.journal import unapplied_records
from node.store.retention import NodeRunning, Retention, SweepReport, hold_node_lock, no_journal
from node.store.spool import Spool

EXIT_OK = 0
EXIT_FAILURE = 1


def _print(report: SweepReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**dataclasses.asdict(report), "bytes": report.size}, indent=2))
        return
    verb = "would delete" if report.dry_run else "deleted"
    for d in report.series:
        print(f"{verb} series {d.series_instance_uid} ({d.state}, {d.reason}): "
              f"{d.files} files, {d.size} bytes")
    if report.quarantine_files:
        print(f"{verb} {report.quarantine_files} quarantine files, "
              f"{report.quarantine_bytes} bytes")
    print(f"{verb} {len(report.series)} series, {report.size} bytes in all; disk "
          f"{report.used_percent_before:.1f} % used")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``qcnode retention``."""
    try:
        settings = load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILURE
    configure_logging(settings.logging.level, settings.logging.json_output)
    dry_run = args.action != "run"
    home = settings.node.home
    home.mkdir(parents=True, exist_ok=True)
    lock_fd: int | None = None
    if not dry_run:
        try:
            lock_fd = hold_node_lock(home, exclusive=True)
        except NodeRunning:
            print("the node is running on this home and sweeps by itself; "
                  "use 'qcnode retention dry-run' to see what it deletes", file=sys.stderr)
            return EXIT_FAILURE
    try:
        pending = unapplied_records(home / "journal") if (home / "journal").is_dir() else 0
        if pending and not dry_run:
            print(f"the receive journal holds {pending} records not yet applied: start "
                  "the node once (it applies them), then run again", file=sys.stderr)
            return EXIT_FAILURE
        with Ledger.open(settings.ledger_url) as ledger:
            spool = Spool(settings.spool_dir, home)
            report = Retention(settings, ledger, spool, no_journal).sweep(dry_run=dry_run)
        _print(report, args.json)
        return EXIT_OK
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
