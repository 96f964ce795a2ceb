"""`moestream generate`: tokenizer from the store, streamed text, and the run report."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

import torch

from ..errors import MoestreamError
from ..units import format_size
from .loader import load_model
from .routing import RoutingRecorder


def load_tokenizer(model):
    """The tokenizer carried in the store (tokenizer.json), as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer
    data = model.store.blob("tokenizer.json")
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise MoestreamError(f"{model.store.path}: the carried tokenizer.json cannot be loaded ({e})") from None


def generate_text(store: str, prompt: str, *, max_new_tokens: int = 64, device: str = "cpu",
                  device_budget=None, host_budget=None, temperature: float = 0.0, seed: int = 0,
                  prefetch: bool = False, prefetch_threshold: float = 0.0, trace: Optional[str] = None,
                  out: TextIO = sys.stdout, err: TextIO = sys.stderr, **store_options) -> dict:
    """Generate from `prompt`, writing text to `out` as it is produced and the report to `err`.
    Returns the report as a dict. trace: a file to record the routing into (formats/trace.py)."""
    t_load = time.perf_counter()
    model = load_model(store, device=device, device_budget=device_budget, host_budget=host_budget, prefetch=prefetch,
                       prefetch_threshold=prefetch_threshold, **store_options)
    try:
        recorder = None
        if trace is not None:
            recorder = RoutingRecorder(model.store.index.moe_layers, model.cfg.num_experts, model.cfg.top_k)
            model.record_routing(recorder)
        tok = load_tokenizer(model)
        ids = tok.encode(prompt).ids
        if model.cfg.bos_token_id is not None and (not ids or ids[0] != model.cfg.bos_token_id):
            ids = [model.cfg.bos_token_id] + ids
        if not ids:
            raise MoestreamError("the prompt encodes to no tokens")
        load_seconds = time.perf_counter() - t_load
        produced: list[int] = []
        shown = ""

        def on_token(nxt: torch.Tensor) -> None:
            nonlocal shown
            produced.append(int(nxt[0]))
            text = tok.decode(produced)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                out.write(text[len(shown):])
                out.flush()
                shown = text

        out.write(prompt)
        out.flush()
        timings: dict = {}
        gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed) if temperature > 0 else None
        model.generate(torch.tensor([ids]), max_new_tokens, temperature, eos_token_id=model.cfg.eos_token_id,
                       on_token=on_token, generator=gen, timings=timings)
        out.write("\n")
        if recorder is not None:
            recorder.trace({"store": str(model.store.path), "prompt_tokens": len(ids), "temperature": temperature,
                            "seed": seed}).save(trace)
        st = model.store.stats()
        report = {
            "prompt_tokens": len(ids), "new_tokens": timings["decode_tokens"], "load_seconds": load_seconds,
            "prefill_tokens_per_s": timings["prefill_tokens"] / timings["prefill_seconds"],
            "decode_tokens_per_s": (timings["decode_tokens"] - 1) / timings["decode_seconds"]
            if timings["decode_tokens"] > 1 and timings["decode_seconds"] > 0 else None,
            "stats": st, "dequant": model.dequant,
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
            f"dequant {model.dequant}\n" + (f"routing trace written to {trace}\n" if trace is not None else ""))
        return report
    finally:
        model.store.close()
