"""A ``vllm serve`` addressed by URL, through its OpenAI-compatible chat API.

Several GPU workers (and hosts) send their requests to one server, which batches them
continuously and caches the shared prompt prefix. Every read-out query is a chat
completion whose assistant turn is continued (``continue_final_message``) from the
card's answer prefix, asking one token with ``logprob_token_ids`` = the score digits
(or the decimal digits after ``Score: d.``) and ``return_tokens_as_token_ids``.

Gemma 3's chat template trims the message text, so ``Score: `` is rendered without its
trailing space, whose token (``▁``) the transformers path teacher-forces. Once per
runner the prompts the server builds are compared with the local processor's
(``/tokenize``), and tokens the template dropped are forced as the first generated
tokens (``allowed_token_ids``); the log-probabilities are read where the transformers
path reads them. Log-probabilities are raw (vLLM's default ``--logprobs-mode``), so the
mask does not touch them.

Requests of one call go out concurrently (threads, ``concurrency`` at most).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import structlog
from PIL import Image

from inference.errors import EngineError
from inference.vlm.prompting import messages
from inference.vlm.source import ModelSource
from inference.vlm.vllm_backend import PromptSpec, Query, VllmOptions

log = structlog.get_logger(__name__)

_TOKEN_ID_PREFIX = "token_id:"  # noqa: S105 (vLLM's token label, not a secret)


class ServerRunner:
    """Client of one OpenAI-compatible vLLM server."""

    def __init__(self, spec: PromptSpec, source: ModelSource, options: VllmOptions) -> None:
        if options.url is None or not options.url.startswith(("http://", "https://")):
            raise EngineError(f"vllm_url must be an http(s) URL, got {options.url!r}")
        self._spec = spec
        self._source = source
        self._options = options
        self._base = options.url.rstrip("/")
        self._forced: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    @cached_property
    def pool(self) -> ThreadPoolExecutor:
        """Threads that keep up to ``concurrency`` requests in flight."""
        return ThreadPoolExecutor(self._options.concurrency, thread_name_prefix="vllm-http")

    @cached_property
    def model(self) -> str:
        """The served model name: configured, else the adapter's LoRA module, else the base."""
        if self._options.served_model is not None:
            return self._options.served_model
        listed = self._get("/v1/models").get("data", [])
        adapter = self._source.adapter_dir
        for entry in listed:
            if adapter is not None and str(entry.get("root")) == str(adapter):
                return str(entry["id"])
        if adapter is not None:
            raise EngineError(
                f"the vLLM server at {self._base} serves no LoRA module from {adapter} "
                "(start it with --enable-lora --lora-modules NAME=DIR, or set vllm_model)"
            )
        if not listed:
            raise EngineError(f"the vLLM server at {self._base} lists no model")
        return str(listed[0]["id"])

    # Runner protocol ---------------------------------------------------------------
    def score(
        self, images: Sequence[Image.Image], queries: Sequence[Query]
    ) -> list[list[dict[int, float]]]:
        """All queries of all images concurrently; per image, per query, the log-probs."""
        urls = [_data_url(im) for im in images]
        for query in queries:
            self._forced_tail(images[0], urls[0], query)
        jobs = [self.pool.submit(self._score_one, url, q) for url in urls for q in queries]
        flat = [job.result() for job in jobs]
        n = len(queries)
        return [flat[i * n:(i + 1) * n] for i in range(len(images))]

    def generate(self, images: Sequence[Image.Image]) -> list[str]:
        """The answers, generated concurrently (greedy unless the card says otherwise)."""
        jobs = [self.pool.submit(self._generate_one, _data_url(im)) for im in images]
        return [job.result() for job in jobs]

    # Requests ------------------------------------------------------------------------
    def _messages(self, url: str, answer: str | None) -> list[dict[str, Any]]:
        turns = messages(self._spec.card)
        turns[0]["content"] = [
            {"type": "image_url", "image_url": {"url": url}} if part["type"] == "image"
            else part for part in turns[0]["content"]
        ]
        if answer is not None:
            turns.append({"role": "assistant", "content": answer})
        return turns

    def _score_one(self, url: str, query: Query) -> dict[int, float]:
        forced = self._forced[query.text]
        body: dict[str, Any] = {
            "model": self.model, "messages": self._messages(url, query.text),
            "continue_final_message": True, "add_generation_prompt": False,
            "add_special_tokens": True, "max_tokens": len(forced) + 1, "temperature": 0.0,
            "logprobs": True, "logprob_token_ids": list(query.read_ids),
            "return_tokens_as_token_ids": True,
        }
        if forced:
            body["allowed_token_ids"] = sorted(set(forced))
        content = self._post("/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
        if len(content) <= len(forced):
            raise EngineError(f"the vLLM server returned {len(content)} tokens, expected "
                              f"{len(forced) + 1}")
        return {_token_id(e["token"]): float(e["logprob"])
                for e in content[len(forced)]["top_logprobs"]}

    def _generate_one(self, url: str) -> str:
        card = self._spec.card
        body = {
            "model": self.model, "messages": self._messages(url, None),
            "add_generation_prompt": True, "add_special_tokens": True,
            "max_tokens": card.max_new_tokens, "temperature": 0.0 if card.greedy else 1.0,
            "skip_special_tokens": True,
        }
        return str(self._post("/v1/chat/completions", body)["choices"][0]["message"]["content"]
                   or "").strip()

    def _forced_tail(self, image: Image.Image, url: str, query: Query) -> None:
        """Once per query: compare the server's prompt with ours; find the dropped tokens.

        The server's ids must be the local processor's prompt ids followed by a prefix of
        the continuation; the rest of the continuation (the template trimmed it) must be
        one repeated token, which is then forced with ``allowed_token_ids``.
        """
        with self._lock:
            if query.text in self._forced:
                return
            body = {"model": self.model, "messages": self._messages(url, query.text),
                    "continue_final_message": True, "add_generation_prompt": False,
                    "add_special_tokens": True}
            served = [int(i) for i in self._post("/tokenize", body)["tokens"]]
            expected = self._spec.expanded_ids(image)
            tail = served[len(expected):]
            cont = list(query.continuation)
            if served[:len(expected)] != expected or cont[:len(tail)] != tail:
                raise EngineError(
                    f"the vLLM server at {self._base} renders the prompt differently from "
                    "the local processor (another model or chat template?); the read-out "
                    "would not mean the same thing"
                )
            forced = tuple(cont[len(tail):])
            if len(set(forced)) > 1:
                raise EngineError(f"the chat template drops tokens {forced} of "
                                  f"{query.text!r}; only one repeated token can be forced")
            self._forced[query.text] = forced
            log.info("vllm_server_checked", url=self._base, forced=len(forced))

    # HTTP ------------------------------------------------------------------------------
    def _get(self, path: str) -> dict[str, Any]:
        url = self._base + path  # http(s), checked in __init__
        return self._request(urllib.request.Request(url, method="GET"))  # noqa: S310

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 (http(s), checked in __init__)
            self._base + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        return self._request(request)

    def _request(self, request: urllib.request.Request) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(request, timeout=self._options.timeout) as reply:  # noqa: S310 (http(s) checked)
                data: dict[str, Any] = json.loads(reply.read())
                return data
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise EngineError(f"vLLM server {request.full_url}: HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise EngineError(f"vLLM server {request.full_url} unreachable: {exc}") from exc


def _data_url(image: Image.Image) -> str:
    """The image as a PNG data URL (lossless: the server sees the same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _token_id(token: str) -> int:
    if not token.startswith(_TOKEN_ID_PREFIX):
        raise EngineError(f"expected a token id ('token_id:N') from the server, got {token!r}")
    return int(token[len(_TOKEN_ID_PREFIX):])
