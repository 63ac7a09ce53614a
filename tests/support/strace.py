"""Reading what ``strace -f -y -xx`` recorded: system calls in the order they happened.

The tracer stops a thread at each traced call's entry and exit (``--seccomp-bpf``
limits the stops to the traced calls) and writes a line for each, so one line before
another in its output happened before it: a call whose exit is recorded before
another call's entry returned before that call began. A call another thread
interrupts is split over two lines (``<unfinished ...>`` and ``<... resumed>``):
:func:`parse` joins them, keeping where each half was recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: The command prefix: follow threads, fds with their paths, every string as hex bytes.
STRACE = ("strace", "-f", "--seccomp-bpf", "-y", "-xx", "-qq")

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$")
_FD = re.compile(r"^(\d+)<((?:\\x[0-9a-f]{2})*)")
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
_RESULT = re.compile(r"\)\s+=\s+(-?\d+)")


@dataclass(frozen=True)
class Call:
    """One system call: its thread, name, the fd's path (or socket description), its
    first string argument's bytes (as far as ``-s`` shows them), result, and the
    output line indexes of its entry and its exit."""

    tid: int
    name: str
    path: str
    data: bytes
    result: int | None
    entry: int
    exit: int


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def _call(tid: int, name: str, args: str, entry: int, exit_: int) -> Call:
    fd = _FD.match(args)
    string = _STRING.search(args)
    result = _RESULT.search(args)
    return Call(
        tid=tid, name=name,
        path=_hex(fd.group(2)).decode("utf-8", "replace") if fd else "",
        data=_hex(string.group(1)) if string else b"",
        result=int(result.group(1)) if result else None, entry=entry, exit=exit_,
    )


def parse(path: Path) -> list[Call]:
    """The calls recorded in an ``strace -o`` file, in the order they ended."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, str, int]] = {}
    for index, line in enumerate(path.read_text(encoding="ascii").splitlines()):
        match = _LINE.match(line)
        if match is None:
            continue
        tid, rest = int(match.group(1)), match.group(2)
        if (unfinished := _UNFINISHED.match(rest)) is not None:
            pending[tid] = (unfinished.group(1), unfinished.group(2), index)
        elif (resumed := _RESUMED.match(rest)) is not None:
            name, args, entry = pending.pop(tid)
            calls.append(_call(tid, name, args + resumed.group(2), entry, index))
        elif (call := _CALL.match(rest)) is not None:
            calls.append(_call(tid, call.group(1), call.group(2), index, index))
    return calls
