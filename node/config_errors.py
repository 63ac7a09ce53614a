"""Configuration errors an admin can act on: where each one is, and what was meant.

:func:`explain` turns pydantic's validation errors, and the checks across sections
(unique destination names, rules naming known destinations), into one list of
:class:`Problem` — all of them in one pass, each with

* its key path (``destinations[1].port``);
* the line of the TOML file that sets it (``tomllib`` keeps no positions:
  :func:`toml_lines` scans ``[table]``, ``[[array]]`` and ``key =`` lines and counts
  the array elements);
* the environment variable instead, when an override ``QCNODE_<SECTION>__<KEY>``
  supplied the value;
* for an unknown key, the closest known one ("did you mean 'ae_title'?", difflib).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]

#: pydantic's error type for a key the model does not have (``extra="forbid"``).
UNKNOWN_KEY = "extra_forbidden"
#: The error type the settings model raises for a cross-section problem; :func:`explain`
#: replaces it with :func:`cross_reference_problems`, which knows the exact keys.
CROSS_REFERENCE = "cross_reference"
SUGGESTION_CUTOFF = 0.6

_HEADER = re.compile(r"^\s*(\[\[|\[)\s*([^\[\]]+?)\s*(\]\]|\])\s*(#.*)?$")
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")


@dataclass(frozen=True)
class Problem:
    """One configuration error: key path, message, and where it was set."""

    key: str
    message: str
    line: int | None = None
    env: str | None = None

    def __str__(self) -> str:
        if self.env is not None:
            return f"{self.env} (environment, {self.key}): {self.message}"
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.key}: {self.message}"


def loc_to_key(loc: Sequence[int | str]) -> str:
    """``("senders", 0, "host")`` → ``senders[0].host``."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(file)"


def _split_key(text: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(r"""[^."']+|"[^"]*"|'[^']*'""", text)
            if p.strip()]


def toml_lines(text: str) -> dict[Loc, int]:
    """Line numbers (1-based) of the tables and keys of a TOML document, by location.

    ``[[destinations]]`` opens ``("destinations", i)`` for its i-th occurrence;
    ``[destinations.tls]`` after it is ``("destinations", i, "tls")``; ``port = 1``
    inside it is ``("destinations", i, "port")``. Lines inside multi-line strings are
    skipped. The first line that sets a location wins.
    """
    lines: dict[Loc, int] = {}
    arrays: dict[Loc, int] = {}  # array-of-tables path → index of its last element
    table: Loc = ()
    in_string: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if raw.count(in_string) % 2 == 1:
                in_string = None
            continue
        header = _HEADER.match(raw)
        if header is not None:
            table = _table_path(_split_key(header.group(2)), header.group(1) == "[[", arrays)
            lines.setdefault(table, number)
            continue
        key = _KEY.match(raw)
        if key is not None:
            lines.setdefault(table + tuple(_split_key(key.group(1))), number)
            rest = raw[key.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_string = quote
    return lines


def _table_path(names: list[str], is_array: bool, arrays: dict[Loc, int]) -> Loc:
    path: Loc = ()
    for i, name in enumerate(names):
        path = (*path, name)
        last = i == len(names) - 1
        if last and is_array:
            arrays[path] = arrays.get(path, -1) + 1
            path = (*path, arrays[path])
        elif path in arrays:
            path = (*path, arrays[path])
    return path


def line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """The line of ``loc``, else of its nearest enclosing table or key that has one."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def env_variable(
    loc: Loc, env_values: Mapping[str, Any], prefix: str, delimiter: str
) -> str | None:
    """The environment variable that supplied ``loc``, or None.

    ``env_values`` is what pydantic-settings read from the environment (nested dicts);
    a whole list or table set by one variable (``QCNODE_SENDERS='[...]'``) names that
    variable for every location inside it.
    """
    names: list[str] = []
    current: Any = env_values
    for part in loc:
        if not isinstance(current, Mapping):
            break  # one variable set this whole list or value
        if not isinstance(part, str) or part not in current:
            return None
        names.append(part)
        current = current[part]
    if not names or isinstance(current, Mapping):
        return None  # nothing, or a whole table partly set from the file
    return (prefix + delimiter.join(names)).upper()


def _model_fields(model: type[BaseModel]) -> dict[str, Any]:
    return {name: field.annotation for name, field in model.model_fields.items()}


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``X``, ``X | None``, ``tuple[X, ...]``, ``Annotated[X, …]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None


def known_keys(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys allowed at ``loc`` (the location of a key: its table is ``loc[:-1]``)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        current = _inner_model(_model_fields(current).get(part))
    if current is None:
        return []
    keys = list(current.model_fields)
    keys += [f.alias for f in current.model_fields.values() if f.alias]
    return keys


def suggestion(model: type[BaseModel], loc: Loc) -> str | None:
    """The known key closest to the unknown last part of ``loc`` (difflib), or None."""
    if not loc or not isinstance(loc[-1], str):
        return None
    close = difflib.get_close_matches(loc[-1].lower(), known_keys(model, loc), n=1,
                                      cutoff=SUGGESTION_CUTOFF)
    return close[0] if close else None


def cross_reference_problems(data: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    """Problems across sections, from raw or dumped settings data.

    Destination names must be unique (each repeat is reported at its own
    ``destinations[i].name``); every destination a rule names must exist.
    """
    problems: list[tuple[Loc, str]] = []
    destinations = data.get("destinations") or ()
    first: dict[str, int] = {}
    for i, dest in enumerate(destinations if isinstance(destinations, Sequence) else ()):
        name = dest.get("name") if isinstance(dest, Mapping) else None
        if not isinstance(name, str):
            continue
        if name in first:
            problems.append((("destinations", i, "name"),
                             f"duplicate destination name {name!r} "
                             f"(also destinations[{first[name]}])"))
        else:
            first[name] = i
    rules = data.get("rules") or ()
    for i, rule in enumerate(rules if isinstance(rules, Sequence) else ()):
        if not isinstance(rule, Mapping):
            continue
        names = rule.get("destinations") or ()
        for dest in names if isinstance(names, Sequence) and not isinstance(names, str) else ():
            if isinstance(dest, str) and dest not in first:
                problems.append((("rules", i, "destinations"),
                                 f"rule {rule.get('name')!r} names unknown destination {dest!r}"))
    return problems


@dataclass(frozen=True)
class Sources:
    """What the settings were built from: the file's text and data, the environment's."""

    text: str
    data: Mapping[str, Any]
    env: Mapping[str, Any]
    env_prefix: str
    env_delimiter: str


def _merged(file_data: Mapping[str, Any], env: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(file_data)
    for key, value in env.items():
        old = merged.get(key)
        merged[key] = (_merged(old, value) if isinstance(old, Mapping)
                       and isinstance(value, Mapping) else value)
    return merged


def explain(exc: ValidationError, model: type[BaseModel], sources: Sources) -> list[Problem]:
    """Every problem of ``exc`` and every cross-section problem, located, in file order."""
    lines = toml_lines(sources.text)
    located: list[tuple[Loc, str]] = []
    for err in exc.errors():
        if err["type"] == CROSS_REFERENCE:
            continue
        loc: Loc = tuple(err["loc"])
        message = err["msg"]
        if err["type"] == UNKNOWN_KEY:
            close = suggestion(model, loc)
            message = "unknown key" + (f"; did you mean {close!r}?" if close else "")
        located.append((loc, message))
    located += cross_reference_problems(_merged(sources.data, sources.env))
    problems = [
        Problem(loc_to_key(loc), message, line_of(loc, lines),
                env_variable(loc, sources.env, sources.env_prefix, sources.env_delimiter))
        for loc, message in located
    ]
    return sorted(problems, key=lambda p: (p.env is None, p.line or 0))
