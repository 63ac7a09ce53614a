"""``qcnode train data splits``: take a published train/validation split into a manifest.

Seed 000's authors trained on LDCTIQA with their own lists (``data/train.jsonl``,
``data/val.jsonl`` in their repository: one JSON object per line whose ``image`` is a
path such as ``./data/LDCTiqa_png/0249.png``), and reported their metrics on the
``val`` list. To compare with their numbers, train and evaluate on the same images:
this tool sets each manifest record's ``split`` by the list that names its image.

Only membership is read from the lists — never their ``output`` text, whose
explanations were written by a teacher that was shown the score. An image is matched by
its file name without extension (``0249``), so PNG lists match the TIFF originals. A
list may also be plain text, one image name or path per line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from inference.dataset import Record


class SplitListError(ValueError):
    """A split list cannot be read, or names an image twice."""


@dataclass(frozen=True)
class SplitImport:
    """The records with their new splits, and what did not match."""

    records: list[Record]
    assigned: dict[str, int]
    unmatched: dict[str, list[str]]  # split -> listed names with no record


def _name(entry: str) -> str:
    return PurePosixPath(entry.strip().replace("\\", "/")).stem


def read_split_list(path: Path) -> list[str]:
    """The image names (file stems) a list holds, in order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SplitListError(f"{path}: {exc}") from exc
    names: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                entry = json.loads(line)["image"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SplitListError(f"{path}: line {number}: no \"image\" ({exc})") from exc
            names.append(_name(str(entry)))
        else:
            names.append(_name(line))
    return names


def import_splits(records: Sequence[Record], lists: dict[str, Path]) -> SplitImport:
    """Set ``split`` of every record whose image a list names; the others keep theirs."""
    owner: dict[str, str] = {}
    for split, path in lists.items():
        for name in read_split_list(path):
            if owner.setdefault(name, split) != split:
                raise SplitListError(f"image {name!r} is in both {owner[name]!r} and {split!r}")
    found: set[str] = set()
    out: list[Record] = []
    assigned = dict.fromkeys(lists, 0)
    for rec in records:
        listed = owner.get(rec.image.stem)
        if listed is None:
            out.append(rec)
            continue
        found.add(rec.image.stem)
        assigned[listed] += 1
        out.append(replace(rec, split=listed))
    unmatched: dict[str, list[str]] = {split: [] for split in lists}
    for name, split in owner.items():
        if name not in found:
            unmatched[split].append(name)
    return SplitImport(out, assigned, unmatched)
