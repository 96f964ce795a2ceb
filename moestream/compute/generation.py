"""`moestream generate`: tokenizer from the store, streamed text, and the run report."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

import torch

from ..errors import MoestreamError, UsageError
from ..units import format_size
from .dequant import store_dequant
from .loader import load_model
from .routing import RoutingRecorder


ENGINES = ("auto", "native", "transformers")


def encode_prompt(tok, text: str, bos: Optional[int]) -> list[int]:
    """`text`'s token ids, the model's bos token first when it has one and the tokenizer did
    not add it."""
    ids = tok.encode(text).ids
    return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids


class StreamedText:
    """The text of a growing list of tokens, handed out as it becomes complete: a token that ends
    inside a multi-byte character decodes to a replacement character until the rest arrives, so
    that text waits; `rest()` at the end gives what is still held back (what tokenizer.decode of
    all the tokens ends with). Used by `generate` and `chat`."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def push(self, token: int) -> str:
        """Add a token; returns the text that is now complete and was not handed out yet."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def rest(self) -> str:
        """What is still held back, handed out now (the end of the run)."""
        text = self.tok.decode(self.ids) if self.ids else ""
        new, self.shown = text[len(self.shown):], text
        return new


def load_tokenizer(model):
    """The tokenizer carried in the store (tokenizer.json), as a `tokenizers.Tokenizer`.
    `model`: a moestream model (its .store) or a Store."""
    from tokenizers import Tokenizer
    store = getattr(model, "store", model)
    data = store.blob("tokenizer.json")
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise MoestreamError(f"{store.path}: the carried tokenizer.json cannot be loaded ({e})") from None


def generate_text(store: str, prompt: str, *, max_new_tokens: int = 64, device: str = "cpu",
                  device_budget=None, host_budget=None, temperature: float = 0.0, seed: int = 0,
                  prefetch: bool = False, prefetch_threshold: float = 0.0, trace: Optional[str] = None,
                  engine: str = "auto", out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                  predictor: Optional[str] = None, extra_guesses: int = 0, **store_options) -> dict:
    """Generate from `prompt`, writing text to `out` as it is produced and the report to `err`.
    Returns the report as a dict. trace: a file to record the routing into (formats/trace.py).
    engine: "native" (moestream's own forward) or "transformers" (transformers' model class with
    the "moestream" experts implementation: integrations/transformers.py); same report. "auto":
    native where moestream has a forward for the family, transformers otherwise. predictor:
    next-layer probes (moestream fit-predictor) for the guesses of --prefetch and --trace;
    extra_guesses: experts each guess names beyond the top-k (load_model)."""
    if engine not in ENGINES:
        raise UsageError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        from ..engines import engine_for
        from ..formats.reader import StoreReader
        with StoreReader(store) as r:
            engine = engine_for(r.index.architecture)
    if engine == "transformers" and (prefetch or trace is not None or predictor is not None or extra_guesses):
        raise UsageError("--prefetch, --predictor, --extra-guesses and --trace need the native engine")
    t_load = time.perf_counter()
    if engine == "transformers":
        from ..extras import require
        require("transformers", "the transformers engine (this store's family has no native forward)")
        from ..integrations.transformers import from_store
        if store_options.pop("dense_quant", "auto") not in ("auto", None):
            raise UsageError("--dense-quant int8/int4 needs the native engine")
        model = from_store(store, device=device, device_budget=device_budget, host_budget=host_budget, **store_options)
        model.store = model.moestream_store
        model.dequant = store_dequant(model.store)
        bos, eos = model.config.bos_token_id, model.config.eos_token_id
    else:
        model = load_model(store, device=device, device_budget=device_budget, host_budget=host_budget,
                           prefetch=prefetch, prefetch_threshold=prefetch_threshold, predictor=predictor,
                           extra_guesses=extra_guesses, **store_options)
        bos, eos = model.cfg.bos_token_id, model.cfg.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    try:
        recorder = None
        if trace is not None:
            recorder = RoutingRecorder(model.store.index.moe_layers, model.cfg.num_experts, model.cfg.top_k)
            model.record_routing(recorder)
        st0 = model.store.stats()
        notes = getattr(model.store, "budget_notes", {})
        err.write(f"budgets: device tier {format_size(st0['l1_budget'])} ({notes.get('device', 'as given')}), host tier "
                  f"{format_size(st0['l2_budget'])} ({notes.get('host', 'as given')})"
                  + ("; on a CPU the host tier holds only extents whose stored form differs from their device-tier "
                     "form (zstd, or int decoded on load): plain extents are read straight into the device tier"
                     if model.store.device.type == "cpu" and st0["l2_budget"] > 0 else "") + "\n")
        tok = load_tokenizer(model)
        ids = encode_prompt(tok, prompt, bos)
        if not ids:
            raise MoestreamError("the prompt encodes to no tokens")
        vocab = model.cfg.vocab_size if hasattr(model, "cfg") else model.config.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise UsageError(f"the prompt has token {bad} ({tok.id_to_token(bad)!r}), outside the model's "
                             f"vocabulary of {vocab}: the store's tokenizer knows more tokens than its model")
        load_seconds = time.perf_counter() - t_load
        streamed = StreamedText(tok)
        produced = streamed.ids
        marks: dict = {}

        def on_token(nxt: torch.Tensor) -> None:
            marks.setdefault("first", time.perf_counter())
            marks["last"] = time.perf_counter()
            new = streamed.push(int(nxt[0]))
            if new:
                out.write(new)
                out.flush()

        out.write(prompt)
        out.flush()
        timings: dict = {}
        interrupted = False
        t_start = time.perf_counter()
        try:
            if engine == "transformers":
                _generate_transformers(model, ids, max_new_tokens, temperature, seed, eos, on_token, timings)
            else:
                gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed) if temperature > 0 else None
                model.generate(torch.tensor([ids]), max_new_tokens, temperature, eos_token_id=eos, on_token=on_token,
                               generator=gen, timings=timings)
        except KeyboardInterrupt:    # Ctrl-C: keep what was made (text, trace, report), then stop
            interrupted = True
        if not timings or interrupted:
            first, last = marks.get("first", time.perf_counter()), marks.get("last", time.perf_counter())
            timings = dict(prefill_tokens=len(ids), prefill_seconds=first - t_start, decode_tokens=len(produced),
                           decode_seconds=last - first)
        # the end of the run: what the incremental decode held back (an incomplete character) is
        # what tokenizer.decode gives for these tokens, and what the server returns
        out.write(streamed.rest() + "\n")
        out.flush()
        if recorder is not None:
            recorder.trace({"store": str(model.store.path), "prompt_tokens": len(ids), "temperature": temperature,
                            "seed": seed, "interrupted": interrupted}).save(trace)
        st = model.store.stats()
        report = {
            "prompt_tokens": len(ids), "new_tokens": timings["decode_tokens"], "load_seconds": load_seconds,
            "prefill_tokens_per_s": timings["prefill_tokens"] / timings["prefill_seconds"],
            "decode_tokens_per_s": (timings["decode_tokens"] - 1) / timings["decode_seconds"]
            if timings["decode_tokens"] > 1 and timings["decode_seconds"] > 0 else None,
            "stats": st, "dequant": model.dequant, "interrupted": interrupted,
        }
        decode = f"{report['decode_tokens_per_s']:.2f} tok/s" if report["decode_tokens_per_s"] else "n/a"
        err.write(
            f"--\nprefill {len(ids)} tokens at {report['prefill_tokens_per_s']:.2f} tok/s; decode "
            f"{report['new_tokens']} tokens at {decode}\n"
            f"experts: {st['hits_l1']} L1 hits, {st['hits_l2']} L2 hits, {st['misses']} reads "
            f"({format_size(st['bytes_read'])} read)"
            + (f", {st['prefetch_issued']} prefetched ({st['prefetch_accuracy'] or 0:.0%} used)" if prefetch else "")
            + f"; stall {st['stall_seconds']:.2f} s; "
            f"device tier {format_size(st['l1_peak'])} of {format_size(st['l1_budget'])}, host tier "
            f"{format_size(st['l2_peak'])} of {format_size(st['l2_budget'])}; io {st['backend']}; "
            f"dequant {model.dequant}; engine {engine}\n"
            + (f"routing trace written to {trace}\n" if trace is not None else "")
            + ("interrupted: the report covers the tokens made before Ctrl-C\n" if interrupted else ""))
        if interrupted:
            raise KeyboardInterrupt
        return report
    finally:
        model.store.close()


def _generate_transformers(model, ids: list[int], max_new_tokens: int, temperature: float, seed: int,
                           eos: Optional[int], on_token, timings: dict) -> None:
    """transformers' own generate, its tokens passed to on_token as they come (a streamer);
    prefill time is up to the first new token."""
    marks: dict = {}

    class _Streamer:
        def put(self, value: torch.Tensor) -> None:
            if "prompt" not in marks:         # generate hands the prompt over first
                marks["prompt"] = True
                return
            marks.setdefault("first", time.perf_counter())
            for t in value.reshape(-1).tolist():
                on_token(torch.tensor([t]))

        def end(self) -> None:
            marks["end"] = time.perf_counter()

    if max_new_tokens < 1 or len(ids) + max_new_tokens > model.config.max_position_embeddings:
        raise UsageError(f"a {len(ids)}-token prompt plus max_new_tokens={max_new_tokens} does not fit the model's "
                         f"context of {model.config.max_position_embeddings} positions")
    torch.manual_seed(seed)
    sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=eos if eos is not None else 0, streamer=_Streamer(),
                             **sample)
    end = marks.get("end", time.perf_counter())
    first = marks.get("first", end)
    new = out.shape[1] - len(ids)
    timings.update(prefill_seconds=first - t0, prefill_tokens=len(ids), decode_seconds=end - first, decode_tokens=new)
