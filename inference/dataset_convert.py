"""Build JSONL manifests (:mod:`inference.dataset`) from common layouts, and validate them.

- **LDCTIQA 2023** (MICCAI grand challenge): a folder of 512×512 float TIFF slices in
  [0, 1] and ``train.json`` mapping each file name to the mean of five radiologists'
  0–4 scores. A seeded hold-out (100 images by default, as in the published MedGemma
  recipe) becomes split ``test``, the rest ``train``.
- **A folder of DICOM CT series + a CSV of scores** (columns ``series`` — a Series
  Instance UID or a sub-folder — and ``score``; optional ``explanation``, ``split``).
  Each series contributes the planes :func:`inference.prepare.prepare_series` would
  select, all with the series' score and one ``group``; the hold-out is by series.

Command line: ``qcnode train data validate M`` / ``ldctiqa ROOT OUT`` / ``dicom DIR CSV OUT``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path
from typing import Any

from inference.dataset import (
    ManifestError,
    Record,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from inference.prepare import PrepareError, Window, group_series, prepare_series
from inference.splits import SplitListError, import_splits

DEFAULT_HOLDOUT = 100
#: The window LDCTIQA's challenge page reports for its slices (others report L−300/W1400).
LDCTIQA_WINDOW = (40.0, 350.0)


class ConvertError(ValueError):
    """The source layout is not what the converter expects (message says what is off)."""


def _ldctiqa_scores(label_file: Path) -> dict[str, float]:
    try:
        data: Any = json.loads(label_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{label_file}: cannot read scores ({exc})") from exc
    if isinstance(data, list):  # [{"image"/"name": …, "score"/"label": …}, …]
        data = {str(d.get("image", d.get("name"))): d.get("score", d.get("label")) for d in data}
    if not isinstance(data, dict) or not data:
        raise ConvertError(f"{label_file}: expected an object mapping file names to scores")
    return {str(k): float(v) for k, v in data.items()}


def _find_image(root: Path, name: str) -> Path | None:
    for folder in (root, root / "image", root / "images", root / "train"):
        for candidate in (folder / name, folder / f"{name}.tif", folder / f"{name}.tiff"):
            if candidate.is_file():
                return candidate
    return None


def convert_ldctiqa(
    root: Path, out: Path, *, holdout: int = DEFAULT_HOLDOUT, seed: int = 0,
    window: tuple[float, float] = LDCTIQA_WINDOW, label_file: Path | None = None,
) -> list[Record]:
    """LDCTIQA layout → manifest at ``out``; returns the records written.

    Scores are checked but not silently fixed: a missing TIFF raises :class:`ConvertError`
    naming it.
    """
    scores = _ldctiqa_scores(label_file or root / "train.json")
    names = sorted(scores)
    missing = [n for n in names if _find_image(root, n) is None]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ConvertError(f"{len(missing)} image(s) listed in the scores are missing: {shown}")
    if not 0 <= holdout < len(names):
        raise ConvertError(f"hold-out {holdout} must be below the {len(names)} images")
    test = set(random.Random(seed).sample(names, holdout))
    records = [
        Record(
            image=(_find_image(root, n) or root / n).resolve(), score=scores[n],
            id=Path(n).stem, split="test" if n in test else "train", window=window,
        )
        for n in names
    ]
    write_manifest(out, records)
    return records


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "series" not in rows[0] or "score" not in rows[0]:
        raise ConvertError(f"{path}: needs a header with at least 'series' and 'score'")
    return rows


def convert_dicom_csv(
    folder: Path, scores_csv: Path, out: Path, *, k: int = 8, holdout_fraction: float = 0.1,
    seed: int = 0,
) -> list[Record]:
    """DICOM series folder + CSV of per-series scores → manifest at ``out``."""
    rows = _read_csv(scores_csv)
    by_uid = group_series([folder])
    series_rows: list[tuple[dict[str, str], list[Path]]] = []
    for row in rows:
        key = row["series"].strip()
        paths = by_uid.get(key)
        if paths is None and (folder / key).is_dir():
            paths = [p for group in group_series([folder / key]).values() for p in group]
        if not paths:
            raise ConvertError(f"{scores_csv}: series {key!r} not found under {folder}")
        series_rows.append((row, paths))
    rng = random.Random(seed)
    n_test = round(holdout_fraction * len(series_rows))
    test = set(rng.sample(range(len(series_rows)), n_test))
    records: list[Record] = []
    for i, (row, paths) in enumerate(series_rows):
        records.extend(_series_records(row, paths, k, "test" if i in test else "train"))
    write_manifest(out, records)
    return records


def _series_records(row: dict[str, str], paths: list[Path], k: int, split: str) -> list[Record]:
    try:
        prepared = prepare_series(paths, k=k, window=Window())
    except PrepareError as exc:
        raise ConvertError(f"series {row['series']}: {exc}") from exc
    by_sop = _sop_paths(paths)
    out = []
    for s in prepared.slices:
        suffix = "" if s.frame is None else f":{s.frame}"
        out.append(Record(
            image=by_sop[s.sop_instance_uid].resolve(), score=float(row["score"]),
            id=f"{s.sop_instance_uid}{suffix}", explanation=row.get("explanation") or None,
            split=row.get("split") or split, frame=s.frame,
            group=prepared.series_instance_uid,
        ))
    return out


def _sop_paths(paths: list[Path]) -> dict[str, Path]:
    from inference.dicom import read_header

    found: dict[str, Path] = {}
    for p in paths:
        header = read_header(p)
        if header is not None:
            for ref in header.frames:
                found[ref.sop_instance_uid] = p
    return found


# Command line -----------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """``qcnode train data …`` handler."""
    try:
        if args.data_command == "validate":
            good, problems = validate_manifest(args.manifest, check_images=not args.no_images)
            for problem in problems:
                print(f"{args.manifest}: {problem}", file=sys.stderr)
            print(f"{args.manifest}: {len(good)} good record(s), {len(problems)} problem(s)")
            return 1 if problems else 0
        if args.data_command == "splits":
            return _splits(args)
        if args.data_command == "ldctiqa":
            records = convert_ldctiqa(args.root, args.out, holdout=args.holdout,
                                      seed=args.seed, window=(args.window[0], args.window[1]))
        else:
            records = convert_dicom_csv(args.folder, args.scores, args.out, k=args.slices,
                                        holdout_fraction=args.holdout_fraction, seed=args.seed)
    except (ConvertError, OSError, ManifestError, SplitListError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n_test = sum(r.split == "test" for r in records)
    print(f"{args.out}: {len(records)} record(s), {n_test} in the test hold-out")
    return 0


def _splits(args: argparse.Namespace) -> int:
    """``qcnode train data splits MANIFEST OUT --list SPLIT=FILE …``."""
    lists: dict[str, Path] = {}
    for item in args.list:
        split, sep, file = item.partition("=")
        if not sep or not split or not file:
            raise ConvertError(f"--list {item!r} is not SPLIT=FILE")
        lists[split] = Path(file)
    done = import_splits(read_manifest(args.manifest), lists)
    write_manifest(args.out, done.records)
    counts = ", ".join(f"{n} {split}" for split, n in done.assigned.items())
    print(f"{args.out}: {len(done.records)} record(s); from the lists: {counts}")
    missing = {split: names for split, names in done.unmatched.items() if names}
    for split, names in missing.items():
        shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
        print(f"{split}: {len(names)} listed image(s) not in {args.manifest}: {shown}",
              file=sys.stderr)
    return 1 if missing else 0
