"""QLoRA SFT on the tiny random Gemma 3 (CPU): labels, loss, adapter reload, resume, overfit.

The model is built on the fly (tests/support/tiny_gemma.py); training runs the real
4-bit NF4 + LoRA code of ``qcnode train``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from inference.card import DEFAULT_CARD, ModelCard
from inference.dataset import read_manifest
from inference.train import TrainOutcome, run
from inference.train_args import TrainArgs, TrainArgsError, load_train_args
from inference.train_data import IGNORE_INDEX, build_example, collate
from inference.vlm.prompting import encode_batch
from node.cli import main as qcnode
from tests.support.labelled import write_series

ANSWER_TEXT = "the image shows noise."


@pytest.fixture(scope="module")
def tiny(tiny_gemma_dir: Path) -> Path:
    """The session's tiny random Gemma 3 (its directory carries the tiny model card)."""
    return tiny_gemma_dir


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i, text in enumerate(("the image shows noise.", "streak artifacts", "good detail.",
                              "low contrast and blur")):
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(root / f"{i}.png")
        lines.append({"image": f"{i}.png", "score": 0.8 + 0.8 * i, "explanation": text,
                      "split": "train"})
    lines.append({"image": "0.png", "score": 2.0, "id": "held", "split": "test"})
    path = root / "m.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _args(tiny: Path, manifest: Path, out: Path, *extra: str) -> TrainArgs:
    return load_train_args(None, [
        f"model.model_dir={json.dumps(str(tiny))}", f"data.manifest={json.dumps(str(manifest))}",
        f"training.output_dir={json.dumps(str(out))}", "training.learning_rate=0.005",
        "training.warmup_ratio=0", "training.save_steps=0", "training.device=\"cpu\"",
        *extra,
    ])


@pytest.fixture(scope="module")
def trained(tiny: Path, manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainOutcome:
    out = tmp_path_factory.mktemp("run") / "adapter"
    return run(_args(tiny, manifest, out, "training.max_steps=5",
                     "training.per_device_train_batch_size=2",
                     "training.gradient_accumulation_steps=2"))


def test_labels_mask_exactly_prompt_image_tokens_and_padding(tiny: Path, manifest: Path) -> None:
    from inference.vlm.loading import load_processor, resolve_source

    processor = load_processor(resolve_source(tiny))
    tok = processor.tokenizer
    card = replace(DEFAULT_CARD, image_size=64)
    records = read_manifest(manifest, split="train")[:2]
    examples = [build_example(processor, card, r) for r in records]
    batch = collate(examples, tok.pad_token_id)
    image_id = tok.convert_tokens_to_ids("<image_soft_token>")
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    for row, rec in enumerate(records):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        mask = batch["attention_mask"][row].bool()
        n_real = int(mask.sum())
        # the prompt is exactly what inference feeds the model
        prompt = encode_batch(processor, card, [Image.open(rec.image).convert("RGB")])
        n_prompt = prompt["input_ids"].shape[1]
        assert torch.equal(ids[:n_prompt], prompt["input_ids"][0])
        answer = ids[n_prompt:n_real].tolist()
        assert answer[-1] == end_of_turn and end_of_turn not in answer[:-1]
        expected = card.answer(rec.score, rec.explanation or "")
        assert tok.decode(answer[:-1]).strip() == expected
        supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert supervised == list(range(n_prompt, n_real))
        assert labels[n_prompt:n_real].tolist() == answer
        assert (labels[:n_prompt] == IGNORE_INDEX).all()  # prompt text, turn markers
        assert (labels[ids == image_id] == IGNORE_INDEX).all()  # image tokens
        assert int((ids == image_id).sum()) == 4
        assert (labels[~mask] == IGNORE_INDEX).all()  # padding
        assert torch.equal(batch["token_type_ids"][row][:n_prompt], prompt["token_type_ids"][0])
    assert int((~batch["attention_mask"].bool()).sum()) > 0  # the batch really was padded


def test_qlora_steps_reduce_the_loss_and_write_outputs(trained: TrainOutcome) -> None:
    losses = [r["loss"] for r in trained.state.history]
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.1, losses
    out = trained.output_dir
    for name in ("adapter_model.safetensors", "adapter_config.json", "qcnode_card.json",
                 "training_log.csv", "loss.png", "train_args.json"):
        assert (out / name).is_file(), name
    assert (out / "training_log.csv").read_text().count("\n") == 6
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert keys and all("language_model" in k for k in keys)
    assert not any("vision" in k for k in keys)
    card = ModelCard.load(out)
    assert card.image_size == 64 and card.prompt == DEFAULT_CARD.prompt
    assert card.base_model_revision and card.adapter_revision
    # the base is really 4-bit NF4
    assert getattr(trained.model, "is_loaded_in_4bit", False)


def test_saved_adapter_reloads_into_the_vlm_engine_with_identical_logits(
    trained: TrainOutcome, tiny: Path, manifest: Path
) -> None:
    from inference.vlm import VlmEngine

    engine = VlmEngine(tiny, trained.output_dir, device="cpu")
    assert engine.card == trained.card
    rec = read_manifest(manifest, split="train")[1]
    image = Image.open(rec.image).convert("RGB")
    inputs = encode_batch(engine.loaded.processor, engine.card, [image],
                          suffix_ids=engine.loaded.tokens.prefix_ids)
    trained.model.eval()
    # training uses eager attention (advised for Gemma 3); the engine the default SDPA
    trained.model.get_base_model().set_attn_implementation(
        engine.loaded.model.get_base_model().config._attn_implementation
    )
    with torch.no_grad():
        ours = trained.model(**inputs).logits
        theirs = engine.loaded.model(**inputs).logits
        with engine.loaded.model.disable_adapter():
            untrained = engine.loaded.model(**inputs).logits
    print("max |Δlogit|", float((ours - theirs).abs().max()))
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, untrained, atol=1e-4)  # the adapter does something


def test_resume_from_checkpoint_equals_an_uninterrupted_run(
    tiny: Path, manifest: Path, tmp_path: Path
) -> None:
    common = ("training.max_steps=4", "training.gradient_accumulation_steps=2",
              "training.save_steps=2", "training.save_total_limit=0")
    full = run(_args(tiny, manifest, tmp_path / "full", *common))
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert checkpoint.is_dir() and (tmp_path / "full" / "checkpoint-4").is_dir()
    # a run interrupted after step 2 continues from that checkpoint in a fresh process state
    resumed = run(_args(tiny, manifest, tmp_path / "part", *common,
                        f"training.resume_from={json.dumps(str(checkpoint))}"))
    assert resumed.state.global_step == 4
    a = [r["loss"] for r in full.state.history]
    b = [r["loss"] for r in resumed.state.history]
    assert b == pytest.approx(a, abs=1e-5)
    wa = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_overfit_answer_comes_back_through_qcnode_assess(tiny: Path, tmp_path: Path) -> None:
    series = tmp_path / "series"
    write_series(series, 3)
    card = replace(DEFAULT_CARD, image_size=64, max_new_tokens=24)
    (tmp_path / "card.json").write_text(json.dumps(card.to_dict()))
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"image": "series/001.dcm", "score": 3.0,
                                    "explanation": ANSWER_TEXT, "split": "train"}) + "\n")
    out = tmp_path / "adapter"
    rc = qcnode([  # through the command line, as a site would run it
        "train", "--model", str(tiny), "--manifest", str(manifest), "--output", str(out),
        "--set", f"model.card={json.dumps(str(tmp_path / 'card.json'))}",
        "--set", "model.lora_dropout=0", "--set", "training.max_steps=40",
        "--set", "training.learning_rate=0.01", "--set", "training.gradient_accumulation_steps=1",
        "--set", "training.lr_scheduler=constant", "--set", "training.warmup_ratio=0",
        "--set", "training.save_steps=0", "--set", "training.gradient_checkpointing=false",
        "--set", "training.device=cpu",
    ])
    assert rc == 0
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "assess", "--engine", "vlm", "--model", str(tiny),
         "--adapter", str(out), "--slices", "2", "--json", str(series)],
        check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ANSWER_TEXT in result["explanation"]
    assert result["engine"]["name"] == "vlm"
    # evaluate reports the paper's metric too: the score written in the generated answer
    report = tmp_path / "eval"
    qcnode(["evaluate", str(manifest), "--engine", "vlm", "--model", str(tiny), "--adapter",
            str(out), "--slices", "1", "--device", "cpu", "--out", str(report)])
    (line,) = (report / f"predictions-vlm+{out.name}-text.jsonl").read_text().splitlines()
    assert json.loads(line)["score"] == pytest.approx(3.0)  # "Score: 3.0" as trained


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(TrainArgsError, match=r"unknown key training\.epochs"):
        load_train_args(None, ["training.epochs=3"])
    with pytest.raises(TrainArgsError, match="must be a number"):
        load_train_args(None, ["model.lora_r=\"big\""])
    toml = tmp_path / "t.toml"
    toml.write_text('[model]\nmodel_dir = "/m"\nlora_r = 8\n[data]\nmanifest = "x.jsonl"\n'
                    '[training]\nmax_steps = 7\n')
    args = load_train_args(toml, ["training.max_steps=9"])
    assert (args.model.lora_r, args.training.max_steps, args.data.manifest) == (8, 9, "x.jsonl")
    args.check()
    with pytest.raises(TrainArgsError, match="model_dir is required"):
        TrainArgs().check()


def test_missing_explanations_fail_with_every_record_named(
    tiny: Path, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = qcnode(["train", "--model", str(tiny), "--manifest", str(manifest),
                 "--output", str(tmp_path / "o"), "--set", "data.train_split=\"test\""])
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 record(s) have no explanation: held (line 5)" in err
    assert "qcnode train explain" in err


def test_published_recipe_adapts_the_vision_tower_and_reports_an_eval_loss(
    tiny: Path, manifest: Path, tmp_path: Path
) -> None:
    """The recipe's options: LoRA on all linear layers (SigLIP included), clipping at 0.3,
    and an eval loss on a fixed sample of the ``val`` split, logged beside the loss.

    The base is loaded unquantised here: bitsandbytes 0.50's CPU 4-bit kernel adds a
    layer's bias in place (``result += bias``), which autograd refuses once a LoRA layer
    upstream makes the input require grad — only SigLIP's layers have biases, so only
    all-linear on CPU meets it (the decoder-only default trains in 4-bit above)."""
    lines = manifest.read_text().splitlines()
    val = [json.dumps({**json.loads(lines[i]), "split": "val", "id": f"val{i}"})
           for i in (1, 2)]
    split_manifest = manifest.parent / "with_val.jsonl"
    split_manifest.write_text("\n".join([*lines[:4], *val]) + "\n")
    args = load_train_args(None, [
        f"model.model_dir={json.dumps(str(tiny))}",
        f"data.manifest={json.dumps(str(split_manifest))}",
        f"training.output_dir={json.dumps(str(tmp_path / 'adapter'))}",
        "training.max_steps=4", "training.eval_steps=2", "training.save_steps=0",
        "training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=1",
        "training.device=\"cpu\"", "training.learning_rate=0.005", "training.warmup_ratio=0",
        "model.load_in_4bit=false",
    ], recipe="published")
    assert (args.model.lora_target_modules, args.training.max_grad_norm) == ("all-linear", 0.3)
    outcome = run(args)
    evals = [(r["step"], r["eval_loss"]) for r in outcome.state.history if "eval_loss" in r]
    assert [step for step, _ in evals] == [2.0, 4.0]
    assert all(np.isfinite(loss) and loss > 0 for _, loss in evals)
    csv_rows = (outcome.output_dir / "training_log.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",eval_loss") and csv_rows[2].split(",")[-1] != ""
    keys = load_file(str(outcome.output_dir / "adapter_model.safetensors")).keys()
    assert any("vision" in k for k in keys) and any("language_model" in k for k in keys)
    with pytest.raises(TrainArgsError, match="unknown recipe"):
        load_train_args(None, [], recipe="mine")


def test_the_authors_split_lists_set_the_manifest_splits(tmp_path: Path) -> None:
    """Their lists hold paths like ./data/LDCTiqa_png/0249.png and a teacher's answer that
    saw the score: only membership is taken, matched by file name without extension."""
    root = tmp_path / "tif"
    root.mkdir()
    lines = []
    for name in ("0249", "0527", "0822", "0900"):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / f"{name}.tif")
        lines.append(json.dumps({"image": f"tif/{name}.tif", "score": 2.0, "split": "train"}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    authors_val = tmp_path / "val.jsonl"
    authors_val.write_text("".join(json.dumps({
        "image": f"./data/LDCTiqa_png/{n}.png", "instruction": "…",
        "output": "Score: 1.8\nReasoning: a rating of 1.8 …"}) + "\n" for n in ("0249", "0822")))
    authors_train = tmp_path / "train.txt"
    authors_train.write_text("0527.png\n0900\n")
    out = tmp_path / "out.jsonl"
    rc = qcnode(["train", "data", "splits", str(manifest), str(out),
                 "--list", f"val={authors_val}", "--list", f"train={authors_train}"])
    assert rc == 0
    got = {r.image.stem: (r.split, r.explanation) for r in read_manifest(out)}
    assert got == {"0249": ("val", None), "0822": ("val", None), "0527": ("train", None),
                   "0900": ("train", None)}
    authors_train.write_text("0527\n0900\n1234\n")  # an image the manifest lacks
    assert qcnode(["train", "data", "splits", str(manifest), str(out),
                   "--list", f"train={authors_train}"]) == 1
