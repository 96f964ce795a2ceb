"""`moestream chat STORE`: an interactive conversation with a store's model on the terminal. The
model is loaded once; each turn formats the whole history with the store's chat template (or a
plain transcript), streams the reply as it is made, and keeps it in the history. Commands:
/exit (or end of input) ends, /reset forgets the history, /stats prints the Store's counters."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

import torch

from .errors import UsageError
from .units import format_size

COMMANDS = "/exit ends, /reset forgets the conversation, /stats prints the expert cache's counters"


def chat(store: str, *, max_new_tokens: int = 256, temperature: float = 0.7, seed: int = 0, device: str = "cpu",
         device_budget=None, host_budget=None, system: Optional[str] = None, inp: TextIO = sys.stdin,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr, **load_options) -> int:
    """Run the conversation until /exit or the end of `inp`; returns the number of replies."""
    from .compute.generation import StreamedText, encode_prompt, load_tokenizer
    from .compute.loader import load_model
    from .engines import engine_for
    from .formats.reader import StoreReader
    from .serving.chat_format import chat_template_of, format_chat
    with StoreReader(store) as r:
        if engine_for(r.index.architecture) != "native":
            raise UsageError(f"moestream chat needs moestream's own forward, which {r.index.architecture!r} "
                             "has not; use moestream serve or the transformers engine")
    model = load_model(store, device=device, device_budget=device_budget, host_budget=host_budget, **load_options)
    try:
        tok = load_tokenizer(model)
        template = chat_template_of(store)
        context, vocab, eos = model.cfg.max_position_embeddings, model.cfg.vocab_size, model.cfg.eos_token_id
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed) if temperature > 0 else None
        err.write(f"moestream chat: {store} ({'its chat template' if template else 'a plain transcript'}; {COMMANDS})\n")
        replies = 0
        while True:
            err.write("> ")
            err.flush()
            line = inp.readline()
            if not line or line.strip() == "/exit":
                break
            text = line.rstrip("\n")
            if text.strip() == "/reset":
                history = history[:1] if system else []
                err.write("(the conversation is forgotten)\n")
                continue
            if text.strip() == "/stats":
                st = model.store.stats()
                err.write(f"experts: {st['hits_l1']} L1 hits, {st['misses']} reads ({format_size(st['bytes_read'])}); "
                          f"device tier {format_size(st['l1_bytes'])} of {format_size(st['l1_budget'])}\n")
                continue
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            ids = encode_prompt(tok, format_chat(history, template), model.cfg.bos_token_id)
            while len(ids) + max_new_tokens > context and len(history) > 1 + bool(system):
                del history[int(bool(system))]            # the oldest turn goes first
                ids = encode_prompt(tok, format_chat(history, template), model.cfg.bos_token_id)
            if len(ids) + max_new_tokens > context:
                err.write(f"(this message is {len(ids)} tokens: with {max_new_tokens} new ones it does not fit the "
                          f"model's context of {context})\n")
                history.pop()
                continue
            if any(not 0 <= i < vocab for i in ids):
                err.write(f"(the message has a token outside the model's vocabulary of {vocab})\n")
                history.pop()
                continue
            streamed = StreamedText(tok)

            def on_token(nxt: torch.Tensor) -> None:
                if eos is not None and int(nxt[0]) == eos:
                    return
                new = streamed.push(int(nxt[0]))
                if new:
                    out.write(new)
                    out.flush()
            t0 = time.perf_counter()
            model.generate(torch.tensor([ids]), max_new_tokens, temperature, eos_token_id=eos, on_token=on_token,
                           generator=gen)
            out.write(streamed.rest() + "\n")
            out.flush()
            reply = streamed.shown
            history.append({"role": "assistant", "content": reply})
            replies += 1
            err.write(f"({len(streamed.ids)} tokens in {time.perf_counter() - t0:.1f} s)\n")
        return replies
    finally:
        model.store.close()
