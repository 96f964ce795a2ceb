"""Continuous batching: one thread owns the model; requests join the running batch at token
boundaries and leave when done. Each decode step runs every active sequence through the
streaming forward once (CausalLM.decode_batch), so an expert several sequences route to is
read once. Per-sequence KV caches of different lengths; attention per sequence, MoE batched.

The scheduler thread owns the model while it serves: nothing else changes its weights, modules or
hooks. So each request's KV cache is frozen (the fused decode calls check it on its first step,
not on each), and where the store holds every expert a step of one sequence reads them through a
lease (CausalLM.lease_experts), taken once and released with model.thaw() at close: a lone
stream decodes as generate does."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..compute.sampling import sample

Emit = Callable[[str, object], None]     # ("delta", text) | ("done", (finish_reason, usage)) | ("error", message)


class QueueFull(Exception):
    """The scheduler's queue is full (HTTP 429)."""


@dataclass(eq=False)
class GenerationRequest:
    """One request: prompt token ids, limits and sampler; `emit` receives its output (called
    from the scheduler thread); set `cancelled` to make it leave the batch at the next token."""
    ids: list[int]
    max_tokens: int
    emit: Emit
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    # scheduler state
    produced: list[int] = field(default_factory=list)
    shown: str = ""
    cache: object = None
    pos: int = 0
    generator: Optional[torch.Generator] = None


class BatchScheduler:
    """Owns `model` (a moestream CausalLM) and `tokenizer` (tokenizers.Tokenizer). At most
    `max_batch` sequences decode together; at most `max_queue` wait (submit raises QueueFull)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64):
        self.model, self.tok = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self._queue: "queue.Queue[GenerationRequest]" = queue.Queue(maxsize=max_queue)
        self.active: list[GenerationRequest] = []
        self.tokens_generated = 0
        self.steps = 0
        self.decode_seconds = 0.0
        self._closed = False
        self._lease = None               # the model's experts' lease (one sequence's steps), or None
        self._lease_asked = False
        self._thread = threading.Thread(target=self._loop, name="moestream-scheduler", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, req: GenerationRequest) -> None:
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are already waiting") from None

    def close(self) -> None:
        """Stop serving: the loop ends after its current step; then the model's lease is released
        and its fused calls trust no frozen cache (generate and other callers may use it again)."""
        self._closed = True
        self._thread.join(timeout=30)
        if self._thread.is_alive():          # a step still running owns the model: leave it be
            return
        release = getattr(self.model, "release_lease", None)
        if release is not None:
            release(self._lease)
        self._lease = None
        thaw = getattr(self.model, "thaw", None)
        if thaw is not None:
            thaw()

    # ---- the scheduler thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            try:
                self._admit()
                if not self.active:
                    continue
                self._step()
            except Exception as e:  # never let the thread die: fail the batch, keep serving
                for r in self.active:
                    r.emit("error", f"generation failed: {e}")
                self.active = []

    def _admit(self) -> None:
        while len(self.active) < self.max_batch:
            try:
                req = self._queue.get(timeout=0.05) if not self.active else self._queue.get_nowait()
            except queue.Empty:
                return
            if req.cancelled.is_set():
                continue
            try:
                req.cache = self.model.new_cache(len(req.ids) + req.max_tokens, frozen=True)
                if req.temperature > 0:
                    req.generator = torch.Generator().manual_seed(req.seed if req.seed is not None
                                                                  else int(time.time_ns() % (1 << 62)))
                with torch.no_grad():
                    logits = self.model(torch.tensor([req.ids]), req.cache, 0)[0, -1]   # prefill
                req.pos = len(req.ids)
                if not self._take(req, logits):
                    self.active.append(req)
            except Exception as e:
                req.emit("error", f"generation failed: {e}")

    def _step(self) -> None:
        self.active = [r for r in self.active if not r.cancelled.is_set()]
        if not self.active:
            return
        if len(self.active) == 1 and not self._lease_asked:
            # asked once, at the first step of a lone sequence (the store then holds what its
            # prefill loaded; later loads join the lease as steps miss them): a store with fewer
            # slots than experts has none, and asking each step would cost a step's bookkeeping
            self._lease_asked = True
            lease = getattr(self.model, "lease_experts", None)
            self._lease = lease() if lease is not None else None
        t0 = time.perf_counter()
        logits = self.model.decode_batch([r.produced[-1] for r in self.active], [r.cache for r in self.active],
                                         [r.pos for r in self.active])                      # [B, V]
        self.decode_seconds += time.perf_counter() - t0
        self.steps += 1
        still = []
        for r, row in zip(self.active, logits):
            r.pos += 1
            if not self._take(r, row):
                still.append(r)
        self.active = still

    def _take(self, r: GenerationRequest, logits: torch.Tensor) -> bool:
        """Sample r's next token from logits [V], emit its text; True when r is finished."""
        tok = _sample(logits, r.temperature, r.top_p, r.generator)
        eos = self.model.cfg.eos_token_id
        if eos is not None and tok == eos:
            return self._finish(r, "stop")
        r.produced.append(tok)
        self.tokens_generated += 1
        text = self.tok.decode(r.produced)
        hits = [at for at in (text.find(s, max(0, len(r.shown) - len(s) + 1)) for s in r.stop) if at >= 0]
        if hits:   # the text ends before the earliest stop string; nothing of it was shown (held back below)
            at = min(hits)
            if at > len(r.shown):
                r.emit("delta", text[len(r.shown):at])
            return self._finish(r, "stop", flush=False)
        # what may be the start of a stop string that the next tokens complete is held back, or a
        # stop spanning a token boundary would leave its first characters in the text
        ready = len(text) - max((k for s in r.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                                 if text.endswith(s[:k])), default=0)
        if not text[:ready].endswith("\ufffd") and ready > len(r.shown):   # a multi-byte character may be incomplete
            r.emit("delta", text[len(r.shown):ready])
            r.shown = text[:ready]
        if len(r.produced) >= r.max_tokens:
            return self._finish(r, "length")
        return False

    def _finish(self, r: GenerationRequest, reason: str, flush: bool = True) -> bool:
        if flush:   # what was held back for a multi-byte character that never completed
            text = self.tok.decode(r.produced)
            if len(text) > len(r.shown):
                r.emit("delta", text[len(r.shown):])
        r.emit("done", (reason, {"prompt_tokens": len(r.ids), "completion_tokens": len(r.produced),
                                 "total_tokens": len(r.ids) + len(r.produced)}))
        r.cache = None       # the KV cache is freed with the request
        return True


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: Optional[torch.Generator]) -> int:
    return int(sample(logits, temperature, top_p, gen))
