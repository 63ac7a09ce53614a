"""``qcnode config list|add|change|remove|set|history`` and ``qcnode user add|remove``.

The shell's side of :mod:`node.config_store`: the same validation, atomic write and
audit trail as the web API. A running ``qcnode serve`` takes the change at its next
reload (``systemctl reload qcnode``, or SIGHUP); through the web API it applies at once.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import tomllib
from typing import Any

from node.config import ConfigError, load_settings, resolve_config_path
from node.config_store import ConfigStore, NotFound

EXIT_OK, EXIT_ERROR = 0, 1
PASSWORD_ENV = "QCNODE_PASSWORD"  # noqa: S105 - the variable's name, not a password


def _entry(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE is read as TOML (``104``, ``["CT"]``, ``true``), else
    taken as text."""
    entry: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not KEY=VALUE")
        try:
            entry[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            entry[key.strip()] = raw
    return entry


def _who() -> str:
    return f"{getpass.getuser()}@shell"


def config_main(args: argparse.Namespace) -> int:
    """``qcnode config ACTION …`` (other than ``check``)."""
    path = resolve_config_path(args.config)
    if path is None or not path.exists():
        print("no configuration file: give --config FILE (or set QCNODE_CONFIG)",
              file=sys.stderr)
        return EXIT_ERROR
    try:
        home = load_settings(path).node.home
    except ConfigError as exc:
        print(exc.report("fix it first (qcnode config check)"), file=sys.stderr)
        return EXIT_ERROR
    store = ConfigStore(path, home / "audit" / "config.jsonl")
    try:
        return _run(store, args)
    except (NotFound, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ConfigError as exc:
        print(exc.report("nothing was written"), file=sys.stderr)
        return EXIT_ERROR


def _run(store: ConfigStore, args: argparse.Namespace) -> int:
    action = args.config_command
    if action == "list":
        print(json.dumps(store.entries(args.section), indent=1))
        return EXIT_OK
    if action == "history":
        for record in store.history(args.limit):
            print(json.dumps(record, ensure_ascii=False))
        return EXIT_OK
    if action == "add":
        store.add(args.section, _entry(args.pairs), _who())
    elif action == "change":
        store.replace(args.section, args.ref, _entry(args.pairs), _who())
    elif action == "remove":
        store.remove(args.section, args.ref, _who())
    else:  # set
        section, _, key = args.key.partition(".")
        store.set_value(section, key, _entry([f"v={args.value}"])["v"], _who())
    print(f"{store.path}: written; a running node applies it at its next reload "
          "(systemctl reload qcnode, or SIGHUP to qcnode serve)")
    return EXIT_OK


def user_main(args: argparse.Namespace) -> int:
    """``qcnode user add NAME --role R`` / ``qcnode user remove NAME``."""
    from node.web.auth import Accounts

    try:
        accounts = Accounts(load_settings(args.config).node.home)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_ERROR
    if args.user_command == "remove":
        if not accounts.remove(args.name):
            print(f"error: no user {args.name!r}", file=sys.stderr)
            return EXIT_ERROR
        return EXIT_OK
    password = os.environ.get(PASSWORD_ENV) or _ask_password()
    try:
        accounts.add(args.name, password, args.role)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{accounts.path}: {args.name} ({args.role})")
    return EXIT_OK


def _ask_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("error: the passwords differ")
    return first


def add_parsers(config_sub: Any, sub: Any, add_config: Any) -> None:
    """The ``config`` actions and the ``user`` command (called by :mod:`node.cli`)."""
    sections = ("senders", "destinations", "rules")
    p = config_sub.add_parser("list", help="the entries of a section")
    p.add_argument("section", choices=sections)
    add_config(p)
    p = config_sub.add_parser("add", help="add an entry: KEY=VALUE …")
    p.add_argument("section", choices=sections)
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    add_config(p)
    p = config_sub.add_parser("change", help="replace an entry (name; a sender's index)")
    p.add_argument("section", choices=sections)
    p.add_argument("ref")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    add_config(p)
    p = config_sub.add_parser("remove", help="remove an entry (name; a sender's index)")
    p.add_argument("section", choices=sections)
    p.add_argument("ref")
    add_config(p)
    p = config_sub.add_parser("set", help="set SECTION.KEY, e.g. node.ae_title")
    p.add_argument("key")
    p.add_argument("value")
    add_config(p)
    p = config_sub.add_parser("history", help="the audit trail of changes, newest first")
    p.add_argument("--limit", type=int, default=50)
    add_config(p)
    for name in ("list", "add", "change", "remove", "set", "history"):
        config_sub.choices[name].set_defaults(handler="config edit")
    u = sub.add_parser("user", help="web API accounts")
    users = u.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    a = users.add_parser("add", help=f"create or reset an account (password: prompt or "
                         f"${PASSWORD_ENV})")
    a.add_argument("name")
    a.add_argument("--role", choices=("read-only", "admin"), default="read-only")
    add_config(a)
    r = users.add_parser("remove", help="delete an account")
    r.add_argument("name")
    add_config(r)
    u.set_defaults(handler="user")


__all__ = ["add_parsers", "config_main", "user_main"]
