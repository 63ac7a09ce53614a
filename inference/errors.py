"""The engine error hierarchy (torch-free).

Every problem that stops an engine from being built or used is an :class:`EngineError`,
so callers (``qcnode assess``, the GPU task) catch one type and print its message. The
more specific errors — a bad model card, a missing model directory or a hub id, a card
that does not fit the tokenizer — are also :class:`ValueError`, as they were before.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """An engine cannot be built or used (bad name, missing model directory, bad card, …)."""
