"""``VlmEngine``: MedGemma + QLoRA as an :class:`inference.engine.Engine`.

Per series: batched forward passes (at most ``max_batch`` slices each) read the score
distribution of every selected slice (:mod:`inference.vlm.readout`: the digit and, for
``Score: X.X`` answers, the decimal digit); the series score is the mean of the slices'
expected scores and its uncertainty the standard deviation of the mixture of their
distributions. Only the slices that decide the series score (by default the worst and
the median, from the card) get a generated explanation — for every series, only below a
score, or never (:class:`~inference.vlm.policy.ExplainPolicy`); its written score is parsed
and compared with the read-out, ratings inside its prose are taken out and contradictions
noted (:mod:`inference.vlm.consistency`), and its statements are mapped to coded findings.

Beside the words, the result carries the physics engine's measurements of the same slices
(noise in HU, streak index, edge, contrast, and where): the evidence the explanation is
read against. A series that is not explained gets those measurements in words instead.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import structlog
import torch

from inference.card import ModelCard
from inference.errors import EngineError
from inference.physics import Evidence, PhysicsEngine
from inference.prepare import PreparedSeries, PreparedSlice
from inference.result import AssessmentResult, EngineInfo, Finding, SliceScore, score_label
from inference.vlm.backend import ScoringBackend
from inference.vlm.consistency import check_ratings
from inference.vlm.findings import extract_findings, merge_findings
from inference.vlm.loading import (
    compute_dtype,
    load_model,
    load_processor,
    native_image_size,
    pick_device,
    resolve_source,
    weights_revision,
)
from inference.vlm.parsing import parse_answer
from inference.vlm.policy import ExplainPolicy
from inference.vlm.prompting import ScoreTokens, prompt_text, score_tokens, to_image
from inference.vlm.readout import SliceReadout, generate_answers, read_scores

ENGINE_NAME = "vlm"
#: Bump when the read-out, aggregation or parsing changes what a result means.
#: 1.1: the read-out reads the decimal digit of ``Score: X.X`` answers (was: digit only).
#: 1.2: ratings inside the prose are removed; physics evidence beside the words.
ENGINE_VERSION = "1.2"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """The model, its processor, and what the read-out needs, loaded once."""

    model: Any
    processor: Any
    tokens: ScoreTokens
    device: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _Explained:
    index: int
    role: str
    text: str


class VlmEngine:
    """The MedGemma VLM engine; weights from local directories only.

    Parameters
    ----------
    model_dir
        A local base model directory (MedGemma-4B-IT snapshot) or a merged model.
    adapter_dir
        A PEFT LoRA adapter directory (with ``qcnode_card.json``), or None.
    device
        ``"auto"`` (GPU if visible), ``"cuda"``, ``"cuda:1"`` or ``"cpu"``.
    quantize
        Load the base 4-bit NF4 (default); false loads it in the compute dtype.
    max_batch
        At most this many slices per forward pass; ``None`` takes the card's
        ``max_batch``. A setting of the host (GPU memory), so it is not part of
        :attr:`info`: results do not depend on it.
    explain
        Which series get a generated explanation (default: every series).
    backend
        Another runtime for the read-out and generation (e.g.
        :class:`~inference.vlm.vllm_backend.VllmBackend`); None: transformers (NF4 +
        peft) in this process. Same weights, same read-out: not part of :attr:`info`.

    The directories and the card are checked at construction (a hub id or a missing
    directory raises :class:`~inference.vlm.loading.ModelDirectoryError`); the model
    itself loads on first use, once per engine (keep one engine per process).
    """

    def __init__(
        self, model_dir: Path | str, adapter_dir: Path | str | None = None,
        device: str = "auto", *, quantize: bool = True, max_batch: int | None = None,
        explain: ExplainPolicy | None = None, backend: ScoringBackend | None = None,
    ) -> None:
        self._source = resolve_source(model_dir, adapter_dir)
        self._backend = backend
        self._card = self._source.card
        #: Says where the card came from when there is none beside the weights.
        self._card_note = "" if self._source.card_found else (
            "no qcnode_card.json found; the default CT-IQA card was used")
        self._device = device
        self._quantize = quantize
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise EngineError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.max_batch: int = max_batch if max_batch is not None else self.card.max_batch
        self.explain = explain or ExplainPolicy()
        self._physics = PhysicsEngine()

    @property
    def card(self) -> ModelCard:
        """The model card in force (beside the adapter, in the merged model, or default;
        without a card, its image size becomes the model's own once loaded)."""
        return self._card

    @cached_property
    def info(self) -> EngineInfo:
        """Engine identity; revisions from the card, else from the weight files."""
        source, card = self._source, self._source.card
        merged = source.adapter_dir is None and card.adapter_revision is not None
        model_rev = card.base_model_revision if not merged else None
        adapter_rev = card.adapter_revision
        if source.adapter_dir is not None and adapter_rev is None:
            adapter_rev = weights_revision(source.adapter_dir)
        return EngineInfo(
            name=ENGINE_NAME, version=ENGINE_VERSION,
            model_revision=model_rev or weights_revision(source.model_dir),
            adapter_revision=adapter_rev,
        )

    @cached_property
    def loaded(self) -> LoadedModel:
        """The model and processor, loaded on first use."""
        device = pick_device(self._device)
        processor = load_processor(self._source)
        model = load_model(self._source, device, quantize=self._quantize)
        if not self._source.card_found:
            self._adopt_image_size(model, processor)
        tokens = score_tokens(processor.tokenizer, self.card, prompt_text(processor, self.card))
        return LoadedModel(model, processor, tokens, device, compute_dtype(device))

    def _adopt_image_size(self, model: Any, processor: Any) -> None:
        """Without a card the default card's image size (MedGemma's 896 px) says nothing
        about these weights: take the size from the model's own processor or vision
        config, and say so in every result's notes."""
        native = native_image_size(model, processor)
        if native is None:
            self._card_note += f" (image size {self._card.image_size} px assumed)"
            return
        size, where = native
        self._card = replace(self._card, image_size=size)
        self._card_note += f", with the image size {size} px from the model's {where}"

    # Engine protocol -------------------------------------------------------------
    def assess(self, series: PreparedSeries) -> AssessmentResult:
        """Score every prepared slice, explain the deciding ones, map findings."""
        if not series.slices:
            raise ValueError(f"series {series.series_instance_uid} has no prepared slices")
        readouts = self.read_slices(series.slices)
        score, _ = aggregate(readouts)
        explained = self._explain(series.slices, readouts) if self.explain.wants(score) else []
        return self._result(series, readouts, explained)

    def assess_many(self, batch: Sequence[PreparedSeries]) -> list[AssessmentResult]:
        """Assess several series together: one result per series, in order.

        The slices of every series share the read-out's forward passes (batches of at
        most :attr:`max_batch`, filled across series), and the deciding slices of every
        series that gets an explanation share the generation batches, so a GPU that
        would idle between small series is kept busy. Each result equals what
        :meth:`assess` gives for its series alone (padding aside, to float rounding).
        """
        for series in batch:
            if not series.slices:
                raise ValueError(f"series {series.series_instance_uid} has no prepared slices")
        every = tuple(s for series in batch for s in series.slices)
        flat = self.read_slices(every)
        readouts: list[list[SliceReadout]] = []
        for series in batch:
            readouts.append(flat[:len(series.slices)])
            flat = flat[len(series.slices):]
        picks: list[tuple[int, list[tuple[int, str]]]] = []
        for n, ro in enumerate(readouts):
            if self.explain.wants(aggregate(ro)[0]):
                scores = [r.expected for r in ro]
                picks.append((n, deciding_slices(scores, self.card.explain_slices)))
        wanted = tuple(batch[n].slices[i] for n, chosen in picks for i, _ in chosen)
        texts = iter(self.generate(wanted))
        explained: dict[int, list[_Explained]] = {
            n: [_Explained(i, role, next(texts)) for i, role in chosen] for n, chosen in picks
        }
        return [self._result(series, ro, explained.get(n, []))
                for n, (series, ro) in enumerate(zip(batch, readouts, strict=True))]

    def read_slices(self, slices: tuple[PreparedSlice, ...]) -> list[SliceReadout]:
        """The score distribution of each slice (batches of at most :attr:`max_batch`)."""
        images = [to_image(s.rgb) for s in slices]
        if self._backend is not None:
            return self._backend.read_scores(images)
        lm = self.loaded
        return read_scores(
            lm.model, lm.processor, self.card, lm.tokens, images,
            dtype=lm.dtype, device=lm.device, max_batch=self.max_batch,
        )

    def generate(self, slices: tuple[PreparedSlice, ...]) -> list[str]:
        """Full generated answers for ``slices`` (batches of at most :attr:`max_batch`)."""
        images = [to_image(s.rgb) for s in slices]
        if self._backend is not None:
            return self._backend.generate(images)
        lm = self.loaded
        return generate_answers(
            lm.model, lm.processor, self.card, images, dtype=lm.dtype, device=lm.device,
            max_batch=self.max_batch,
        )

    # Internals -------------------------------------------------------------------
    def _explain(
        self, slices: tuple[PreparedSlice, ...], readouts: list[SliceReadout]
    ) -> list[_Explained]:
        picks = deciding_slices([r.expected for r in readouts], self.card.explain_slices)
        texts = self.generate(tuple(slices[i] for i, _ in picks))
        return [_Explained(i, role, t) for (i, role), t in zip(picks, texts, strict=True)]

    def _result(
        self, series: PreparedSeries, readouts: list[SliceReadout], explained: list[_Explained]
    ) -> AssessmentResult:
        score, spread = aggregate(readouts)
        notes: list[str] = [self._card_note] if self._card_note else []
        measured = self._measure(series, notes)
        if series.window != self.card.window:
            notes.append(
                f"slices were windowed with {series.window}, the model card expects "
                f"{self.card.window}"
            )
        paragraphs: list[str] = []
        finding_groups: list[tuple[Finding, ...]] = []
        for item in explained:
            sl, ro = series.slices[item.index], readouts[item.index]
            parsed = parse_answer(item.text, self.card.reasoning_prefix)
            notes.extend(_disagreement(f"{item.role} slice ({sl.name})", ro, parsed.score,
                                       parsed.problem, self.card))
            checked = check_ratings(parsed.reasoning, ro.expected,
                                    self.card.disagreement_threshold)
            notes.extend(
                f"{item.role} slice ({sl.name}): its explanation rated the image {r.text!r}, "
                f"the read-out gives {ro.expected:.1f}; that sentence was left out"
                for r in checked.contradictions
            )
            if checked.text:
                paragraphs.append(
                    f"{item.role.capitalize()} slice ({sl.name}, score {ro.expected:.1f}): "
                    f"{checked.text}"
                )
                finding_groups.append(extract_findings(checked.text, sl.sop_instance_uid))
        read = (f"Score {score:.1f} ± {spread:.1f} of 4 ({score_label(_clamp(score))}) read "
                f"from the model's score probabilities over {len(readouts)} slices")
        if paragraphs:
            explanation = "\n\n".join(paragraphs)
        elif measured is not None:
            explanation = f"{measured.text} {read}."
            finding_groups.append(measured.findings)
        else:
            explanation = f"{read}; the model generated no explanation."
        slice_scores = tuple(
            SliceScore(s.sop_instance_uid, _clamp(r.expected), r.std, frame=s.frame)
            for s, r in zip(series.slices, readouts, strict=True)
        )
        log.info(
            "vlm_assessed", series_uid=series.series_instance_uid, slices=len(readouts),
            explained=len(explained), score=round(score, 3),
        )
        return AssessmentResult(
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            score=_clamp(score), uncertainty=spread, explanation=explanation,
            engine=self.info, slices=slice_scores,
            findings=merge_findings(finding_groups),
            evidence=measured.measurements if measured is not None else (),
            notes=(*series.notes, *notes),
        )

    def _measure(self, series: PreparedSeries, notes: list[str]) -> Evidence | None:
        """The physics measurements of the assessed slices, or None (with a note)."""
        try:
            return self._physics.evidence(series)
        except ValueError as exc:
            notes.append(f"no physics measurements beside the model's words: {exc}")
            return None


def deciding_slices(scores: list[float], roles: tuple[str, ...]) -> list[tuple[int, str]]:
    """Indices of the slices to explain: worst (lowest), median, best; no duplicates."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    where = {"worst": order[0], "median": order[(len(order) - 1) // 2], "best": order[-1]}
    picks: list[tuple[int, str]] = []
    for role in roles:
        index = where[role]
        if all(index != i for i, _ in picks):
            picks.append((index, role))
    return picks


def aggregate(readouts: list[SliceReadout]) -> tuple[float, float]:
    """Series score (mean of expected slice scores) and the mixture's standard deviation."""
    means = [r.expected for r in readouts]
    mean = statistics.fmean(means)
    var = statistics.fmean(r.std**2 + (m - mean) ** 2 for r, m in zip(readouts, means, strict=True))
    return mean, math.sqrt(max(var, 0.0))


def _disagreement(
    which: str, readout: SliceReadout, written: float | None, problem: str | None,
    card: ModelCard,
) -> list[str]:
    if written is None:
        return [f"{which}: {problem}; the read-out score {readout.expected:.1f} is used"]
    gap = abs(written - readout.expected)
    if gap > card.disagreement_threshold:
        return [
            f"{which}: generated text says score {written:g}, the score read-out gives "
            f"{readout.expected:.1f} (difference {gap:.1f}, more than "
            f"{card.disagreement_threshold:g})"
        ]
    return []


def _clamp(value: float) -> float:
    return min(4.0, max(0.0, float(value)))
