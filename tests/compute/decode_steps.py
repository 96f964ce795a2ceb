"""What the decode-path tests share: a small model converted from a built checkpoint, and the
logits of a prefill followed by decode steps."""
from __future__ import annotations

import torch


def small_model(tmp_path, family: str, quant: str, **budget):
    """A seed-5 bf16 checkpoint of `family` converted to `quant` under tmp_path and loaded with no
    host tier (`budget`: load_model's device_budget, if given)."""
    import moestream
    from moestream.compute import load_model
    from moestream.demo import build_checkpoint
    ckpt = build_checkpoint(family, tmp_path / "ckpt", seed=5, dtype="bfloat16", with_tokenizer=False)
    return load_model(moestream.convert(ckpt, tmp_path / "store", quant=quant, progress=False), host_budget=0,
                      **budget)


def decode_logits(model, ids: torch.Tensor, steps: int, frozen: bool = False) -> torch.Tensor:
    """Next-token logits of a 4-token prefill, then of each decode step up to `steps` positions
    (`frozen`: in a frozen KV cache, as generate's: the fused calls check their plans once)."""
    cache = model.new_cache(steps + 8)
    cache.frozen = frozen
    with torch.no_grad():
        out = [model(ids[:, :4], cache, 0)[:, -1]]
        out += [model(ids[:, p:p + 1], cache, p)[:, -1] for p in range(4, steps)]
    return torch.stack(out)


def counting_leased(monkeypatch) -> list:
    """(top-k, whether the lease had every chosen expert) of each decode_moe._moe_leased call from now on."""
    from moestream.compute import decode_moe
    calls, real = [], decode_moe._moe_leased

    def counted(*a):
        done = real(*a)
        calls.append((a[2], done))
        return done
    monkeypatch.setattr(decode_moe, "_moe_leased", counted)
    return calls
