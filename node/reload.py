"""Reloading the settings file into a running ``qcnode serve`` (SIGHUP).

What changes at run time: who may send (``[[senders]]``), where reports go
(``[[destinations]]``) and which series are assessed (``[[rules]]``). The listener
reads these per association and per instance, so the new values apply to the next
A-ASSOCIATE-RQ and the next C-STORE; associations already open go on undisturbed.
Everything else — port, bind address, AE title, home, ledger, broker, engine, limits
and timeouts — is bound to sockets, files and processes at start-up: when the file
changes one of those, the reload logs which keys wait for a restart and keeps their
running values.

An invalid file (every error, as ``qcnode config check`` lists them) is logged as
``config_reload_failed`` and the running settings stay as they were: a typo never
stops a node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import ConfigError, Settings, load_settings, resolve_config_path
from node.logs import get_logger

log = get_logger(__name__)

#: The sections a running node takes from a reloaded file.
RELOADABLE: tuple[str, ...] = ("senders", "destinations", "rules")

@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: the settings to run with, and what could not change."""

    settings: Settings
    changed: tuple[str, ...]
    restart_needed: tuple[str, ...]


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = sorted(set(old) | set(new))
        return [d for k in keys
                for d in _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)]
    return [] if old == new else [prefix]


def plan_reload(current: Settings, new: Settings) -> ReloadPlan:
    """The running ``current`` settings with the reloadable sections of ``new``."""
    changed = tuple(s for s in RELOADABLE if getattr(current, s) != getattr(new, s))
    fixed = set(RELOADABLE)
    restart = _differences(current.model_dump(exclude=fixed), new.model_dump(exclude=fixed), "")
    merged = current.model_copy(update={s: getattr(new, s) for s in RELOADABLE})
    return ReloadPlan(merged, changed, tuple(restart))


#: A running part that takes a reload's settings (:attr:`ReloadPlan.settings`).
Apply = Callable[[ReloadPlan], None]


class Reloader:
    """Loads the settings file again and hands the result to the running parts.

    ``config`` is what ``serve`` was started with (``--config`` or None: the same
    search as at start). Each of ``targets`` receives the new settings; they are the
    listener, the completion monitor and the pipeline (see :meth:`node.serve.Node.apply`
    and :meth:`node.pipeline.service.Pipeline.apply`).
    """

    def __init__(self, config: Path | None, current: Settings, targets: list[Apply]) -> None:
        self.config = config
        self.current = current
        self.targets = targets
        #: The last reload's plan (None before the first, or when it failed).
        self.last: ReloadPlan | None = None

    @property
    def path(self) -> Path | None:
        """The file a reload reads (None: built-in defaults and the environment only)."""
        return resolve_config_path(self.config)

    def reload(self) -> bool:
        """Reload once; False (and the old settings kept) when the file is invalid."""
        try:
            new = load_settings(self.config)
        except ConfigError as exc:
            log.error("config_reload_failed", source=exc.source,
                      errors=[str(p) for p in exc.issues])
            self.last = None
            return False
        plan = plan_reload(self.current, new)
        for apply in self.targets:
            try:
                apply(plan)
            except Exception:  # the other parts still take the new settings
                log.exception("config_reload_apply_failed",
                              target=getattr(apply, "__qualname__", "?"))
        self.current = plan.settings
        self.last = plan
        if plan.restart_needed:
            log.warning("config_restart_needed", keys=list(plan.restart_needed),
                        note="these keys keep their running values until a restart")
        log.info("config_reloaded", changed=list(plan.changed),
                 restart_needed=list(plan.restart_needed))
        return True
