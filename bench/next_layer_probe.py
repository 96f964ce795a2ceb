"""Next-layer prediction on the trained routing model: layer l+1's router applied to layer l's
residual (what `--prefetch` uses) against a linear probe fitted on training text (ridge
regression from that residual, normed by layer l+1's norm, to layer l+1's router logits), and
the same two from the residual entering layer l+1 (after layer l's MoE, before layer l+1's
attention: "pre-attention", with one attention block of lead time instead of one MoE block).
Both are scored on held-out text: share of the router's real top-k that the top-k guess hits
(precision = recall for top-k guesses), and precision/recall of guesses whose softmax
probability reaches a threshold.

    .venv/bin/python bench/next_layer_probe.py [--train-tokens 20000] [--test-tokens 4000]"""
from __future__ import annotations

import argparse

import torch

from moestream.bench import routing_model
from moestream.bench.routing_model import TRAIN, corpus_text
from moestream.compute import load_model
from moestream.compute.generation import load_tokenizer
from moestream.compute.predictor import probe_logits, ridge, top_k_hit


def collect(model, tok, texts, n_tokens):
    """Per layer: the residual entering the MoE norm [N, H], the router logits [N, E] and the
    residual entering the layer [N, H]."""
    layers = range(len(model.layers))
    res: dict = {l: [] for l in layers}
    logits: dict = {l: [] for l in layers}
    inp: dict = {l: [] for l in layers}
    hooks = []
    for l, layer in enumerate(model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, args, l=l: inp[l].append(args[0].reshape(-1, args[0].shape[-1]))))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, l=l: res[l].append(args[0].reshape(-1, args[0].shape[-1]))))
        hooks.append(layer.mlp.gate.register_forward_hook(lambda mod, args, out, l=l: logits[l].append(out)))
    total = 0
    with torch.no_grad():
        for t in texts:
            ids = tok.encode(t).ids[:256]
            if len(ids) < 32:
                continue
            model(torch.tensor([ids]))
            total += len(ids)
            if total >= n_tokens:
                break
    for h in hooks:
        h.remove()
    cat = lambda d: {l: torch.cat(d[l]).float() for l in layers}
    return cat(res), cat(logits), cat(inp)


def score(guess_logits, real_logits, k, thresholds=(0.1, 0.2)):
    real = real_logits.topk(k, -1).indices
    out = {"top_k_hit": top_k_hit(guess_logits, real_logits, k)}
    p = guess_logits.softmax(-1).topk(k, -1)
    for thr in thresholds:
        ok = p.values >= thr
        hits = ((p.indices[:, :, None] == real[:, None, :]).any(-1) & ok).sum().item()
        out[f">= {thr}"] = (hits / max(int(ok.sum()), 1), hits / real.numel())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-tokens", type=int, default=20000)
    p.add_argument("--test-tokens", type=int, default=4000)
    p.add_argument("--ridge", type=float, default=1.0)
    a = p.parse_args()
    store, _ = routing_model.ensure_store()
    train, test = corpus_text(TRAIN["corpus_bytes"], TRAIN["held_out_files"])
    model = load_model(store, device_budget="64MiB")
    try:
        tok = load_tokenizer(model)
        res_tr, log_tr, inp_tr = collect(model, tok, train[::7], a.train_tokens)
        res_te, log_te, inp_te = collect(model, tok, test, a.test_tokens)
        k = model.cfg.top_k
        print(f"trained routing model; probe fitted on {len(res_tr[0])} training tokens, scored on {len(res_te[0])} "
              f"held-out tokens; top-{k}")
        print("| layer | predictor | top-k hit | precision/recall at p >= 0.1 | at p >= 0.2 |\n|---|---|---:|---:|---:|")
        with torch.no_grad():
            for l in range(len(model.layers) - 1):
                nxt = model.layers[l + 1]
                norm = lambda h: nxt.post_attention_layernorm(h.to(nxt.post_attention_layernorm.weight.dtype)).float()
                for where, x_tr, x_te in (("layer l's residual", norm(res_tr[l]), norm(res_te[l])),
                                          ("pre-attention", norm(inp_tr[l + 1]), norm(inp_te[l + 1]))):
                    w = torch.from_numpy(ridge(x_tr, log_tr[l + 1], a.ridge))   # the fit of fit-predictor
                    for name, guess in (("next router", nxt.mlp.gate(x_te.to(nxt.mlp.gate.weight.dtype)).float()),
                                        ("linear probe", probe_logits(w, x_te))):
                        s = score(guess, log_te[l + 1], k)
                        cells = " | ".join(f"{v[0]:.0%} / {v[1]:.0%}" for key, v in s.items() if key != "top_k_hit")
                        print(f"| {l + 1} | {name}, {where} | {s['top_k_hit']:.0%} | {cells} |")
    finally:
        model.store.close()


if __name__ == "__main__":
    main()
