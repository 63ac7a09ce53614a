"""The ``qcnode`` command line: one entry point, one sub-command per task.

Each sub-command's work lives in its own module and is imported only when that
sub-command runs, so ``qcnode serve`` never imports torch and ``qcnode assess`` never
imports the networking stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# name -> "module:function"; each function takes the parsed arguments, returns an exit code.
_HANDLERS: dict[str, str] = {
    "serve": "node.serve:main",
    "worker": "node.worker:main",
    "config check": "node.cli:config_check",
    "config edit": "node.config_cli:config_main",
    "user": "node.config_cli:user_main",
    "status": "node.status:main",
    "retry": "node.status:retry_main",
    "retention": "node.retention_cli:main",
    "echo": "node.send.scu:echo_main",
    "assess": "inference.cli:assess_main",
    "synth": "inference.synth:main",
    "train": "inference.train:main",
    "train explain": "inference.explain:main",
    "train data": "inference.dataset_convert:main",
    "evaluate": "inference.evaluate:main",
}


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None,
        help="TOML settings file (default: ./qcnode.toml if present, else built-in defaults)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcnode", description="DICOM node for explainable CT image-quality reports."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the DICOM listener, completion and embedded workers")
    _add_config(p)
    p.set_defaults(handler="serve")

    p = sub.add_parser("worker", help="run a Celery worker for one pipeline stage")
    _add_config(p)
    p.add_argument("--queues", required=True, help="gpu, io, or gpu,io")
    p.add_argument("--concurrency", type=int, default=1)
    p.set_defaults(handler="worker")

    p = sub.add_parser("config", help="configuration tools")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = config_sub.add_parser("check", help="validate a settings file; lists every error")
    c.add_argument("file", type=Path, nargs="?", default=None)
    c.set_defaults(handler="config check")
    from node.config_cli import add_parsers

    add_parsers(config_sub, sub, _add_config)

    p = sub.add_parser("status", help="series by state, failures, queue depths")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=200, help="most recent series listed")
    p.set_defaults(handler="status")

    p = sub.add_parser("retry", help="re-queue a failed series, or all dead-lettered ones")
    _add_config(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("series", nargs="?", help="Series Instance UID")
    g.add_argument("--failed", action="store_true", help="every failed series")
    p.set_defaults(handler="retry")

    p = sub.add_parser("retention", help="what retention deletes (dry-run), or delete now")
    _add_config(p)
    p.add_argument("action", nargs="?", choices=("dry-run", "run"), default="dry-run")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler="retention")

    p = sub.add_parser("echo", help="C-ECHO a configured destination")
    _add_config(p)
    p.add_argument("name", help="destination name from the config")
    p.set_defaults(handler="echo")

    p = sub.add_parser("assess", help="assess CT series offline (files or folders)")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.add_argument("--engine", choices=("physics", "vlm"), default="physics")
    p.add_argument("--model", type=Path, default=None, help="local model directory (vlm)")
    p.add_argument("--adapter", type=Path, default=None, help="local LoRA adapter directory")
    p.add_argument("--slices", type=int, default=8, help="slices assessed per series")
    p.add_argument("--json", action="store_true", help="one JSON object per line per series")
    p.add_argument("--sr-out", type=Path, default=None, help="write each series' SR here")
    p.set_defaults(handler="assess")

    p = sub.add_parser("synth", help="write synthetic CT series with known quality")
    p.add_argument("out", type=Path)
    p.add_argument("--dose-levels", type=float, nargs="+", default=[1.0])
    p.add_argument("--artifacts", nargs="*", default=[], choices=("metal", "none"))
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="the same seed, the same pixels")
    p.add_argument("--uid-seed", default=None, metavar="TEXT",
                   help="derive the UIDs from TEXT (default: fresh UIDs on every run)")
    p.add_argument("--transfer-syntax", default="explicit",
                   choices=("explicit", "implicit", "rle", "jpeg-ls", "jpeg2000"))
    p.set_defaults(handler="synth")

    _add_train(sub)
    _add_evaluate(sub)
    return parser


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="QLoRA fine-tuning of the VLM (and its data tools)")
    p.add_argument("--args", type=Path, default=None, help="TOML/JSON training arguments")
    p.add_argument("--model", type=Path, default=None, help="local base model directory")
    p.add_argument("--manifest", type=Path, default=None, help="JSONL training manifest")
    p.add_argument("--output", type=Path, default=None, help="adapter output directory")
    p.add_argument("--resume", default=None, help="checkpoint directory, or 'latest'")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one argument, e.g. training.max_steps=10")
    p.add_argument("--recipe", choices=("published",), default=None,
                   help="start from the published recipe (all-linear LoRA, clip 0.3, eval loss)")
    p.set_defaults(handler="train")
    actions = p.add_subparsers(dest="train_command", metavar="ACTION")
    e = actions.add_parser("explain", help="draft explanations for a scores-only manifest")
    e.add_argument("manifest", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--teacher-url", default=None, help="OpenAI-compatible base URL (…/v1)")
    e.add_argument("--teacher-model", default=None)
    e.add_argument("--teacher-key-env", default=None, help="env variable holding an API key")
    e.add_argument("--timeout", type=float, default=120.0)
    e.add_argument("--overwrite", action="store_true", help="replace existing explanations")
    e.set_defaults(handler="train explain")
    d = actions.add_parser("data", help="validate or build training manifests")
    data = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    v = data.add_parser("validate", help="print every bad record of a manifest")
    v.add_argument("manifest", type=Path)
    v.add_argument("--no-images", action="store_true", help="skip opening the images")
    v = data.add_parser("ldctiqa", help="LDCTIQA TIFF folder + train.json -> manifest")
    v.add_argument("root", type=Path)
    v.add_argument("out", type=Path)
    v.add_argument("--holdout", type=int, default=100)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--window", type=float, nargs=2, default=[40.0, 350.0],
                   metavar=("CENTER", "WIDTH"), help="HU window the TIFFs were made with")
    v = data.add_parser("splits", help="set splits from published lists (e.g. the authors')")
    v.add_argument("manifest", type=Path)
    v.add_argument("out", type=Path)
    v.add_argument("--list", action="append", required=True, metavar="SPLIT=FILE",
                   help="a JSONL (with \"image\") or text list, e.g. val=val.jsonl")
    v = data.add_parser("dicom", help="folder of DICOM series + CSV of scores -> manifest")
    v.add_argument("folder", type=Path)
    v.add_argument("scores", type=Path)
    v.add_argument("out", type=Path)
    v.add_argument("--slices", type=int, default=8, help="planes per series")
    v.add_argument("--holdout-fraction", type=float, default=0.1)
    v.add_argument("--seed", type=int, default=0)
    d.set_defaults(handler="train data")


def _add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate", help="agreement of an engine with labelled scores")
    p.add_argument("manifest", type=Path, help="JSONL manifest with radiologist scores")
    p.add_argument("--engine", choices=("physics", "vlm"), default="physics")
    p.add_argument("--model", type=Path, default=None, help="local model directory (vlm)")
    p.add_argument("--adapter", type=Path, default=None, help="local LoRA adapter directory")
    p.add_argument("--predictions", type=Path, default=None,
                   help="score saved predictions (JSONL with id and score) instead")
    p.add_argument("--compare", default=None, metavar="SPEC",
                   help="a second run: physics | vlm | adapter=DIR | predictions=FILE")
    p.add_argument("--split", default=None, help="only records of this split")
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="report directory")
    p.add_argument("--slices", type=int, default=8, help="slices per series record")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worst", type=int, default=10, help="worst-disagreeing cases listed")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler="evaluate")


def config_check(args: argparse.Namespace) -> int:
    """``qcnode config check [F]``: print every error in one pass — key path, line of the
    file or environment variable, "did you mean" for unknown keys; non-zero if any."""
    from node import tls_files
    from node.config import ConfigError, load_settings, resolve_config_path

    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return EXIT_FAILURE
    path = resolve_config_path(args.file)
    tls_problems = tls_files.check(settings, path.read_text("utf-8") if path else "")
    if tls_problems:  # the files [node.tls] names: readable, matching, in date
        print(ConfigError(str(path), tls_problems).report(), file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"{path if path else '(built-in defaults)'}: OK — AE {settings.node.ae_title} "
        f"on {settings.node.host}:{settings.node.port}, {len(settings.senders)} sender(s), "
        f"{len(settings.destinations)} destination(s), {len(settings.rules)} rule(s), "
        f"engine {settings.engine.name}"
    )
    return EXIT_OK


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module_name, func_name = target.split(":")
    func: Callable[[argparse.Namespace], int] = getattr(import_module(module_name), func_name)
    return func


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qcnode`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler = args.handler
    try:
        return _resolve(_HANDLERS[handler])(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
