"""The fused decode calls of a layer's attention half and of the final norm and lm_head
(compute/decode_layer.py) against the modules they replace: the same logits bit for bit, on every store type whose weights its kernels
read, across both of its branches (its own attention, then torch's SDPA); and the cases it must
leave to the modules."""
from __future__ import annotations

import pytest
import torch

from moestream.compute import decode_layer, decode_ops
from moestream.compute.models.common import CausalLM, DecoderLayer

from .decode_steps import decode_logits, small_model


@pytest.mark.parametrize("family,quant", [("qwen3_moe", "keep"), ("qwen3_moe", "int8"), ("qwen3_moe", "int4"),
                                          ("mixtral", "int4"), ("mixtral", "keep")])
def test_the_fused_attention_half_gives_the_modules_logits_bit_for_bit(tmp_path, monkeypatch, family, quant):
    model = small_model(tmp_path, family, quant)
    monkeypatch.setattr(decode_ops, "MAX_ATTENDED_POSITIONS", 12)      # both branches within 24 positions
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    fused, fused_head, taken, heads, checked = decode_layer.attention_half, decode_layer.head, [], [], []

    def counted(plan, x, cos, sin, ck, cv, pos, **kw):
        out = fused(plan, x, cos, sin, ck, cv, pos, **kw)
        taken.append(pos if out is not None else None)
        checked.append(kw.get("checked", False))
        return out

    def counted_head(plan, x):
        out = fused_head(plan, x)
        heads.append(out is not None)
        return out
    try:
        assert model.embed_tokens.weight.dtype == torch.bfloat16
        monkeypatch.setattr(DecoderLayer, "attention_half", lambda *a: None)
        monkeypatch.setattr(CausalLM, "_fused_head", lambda *a: None)
        want = decode_logits(model, ids, 24)
        monkeypatch.undo()
        monkeypatch.setattr(decode_ops, "MAX_ATTENDED_POSITIONS", 12)
        monkeypatch.setattr(decode_layer, "attention_half", counted)
        monkeypatch.setattr(decode_layer, "head", counted_head)
        got = decode_logits(model, ids, 24)
        steps = len(taken)
        got_frozen = decode_logits(model, ids, 24, frozen=True)     # generate's cache: checked once
    finally:
        model.store.close()
    # every decode step of every layer took the fused calls (the prefill did not)
    assert sorted(set(taken)) == list(range(4, 24)) and steps == 20 * model.cfg.num_layers
    assert taken[steps:] == taken[:steps] and heads == [True] * 40
    # the frozen cache's calls: each layer's first step checked in full, every later one trusted
    assert checked[:steps] == [False] * steps
    assert checked[steps:] == [False] * model.cfg.num_layers + [True] * (steps - model.cfg.num_layers)
    assert torch.equal(got, want) and torch.equal(got_frozen, want)


def _first_layer(tmp_path, quant: str, pos: int):
    """A Qwen3-MoE store's model, its first layer, an 8-position KV cache, the rope of `pos` and a
    decode token's hidden state."""
    model = small_model(tmp_path, "qwen3_moe", quant)
    x = torch.randn(1, 1, model.cfg.hidden_size).to(torch.bfloat16)
    return model, model.layers[0], model.new_cache(8), model.rotary.at(pos, torch.bfloat16), x


def test_the_fused_call_leaves_what_it_cannot_take_to_the_modules(tmp_path):
    model, layer, cache, rope, x = _first_layer(tmp_path, "int4", 2)
    try:
        with torch.no_grad():
            assert layer.attention_half(x, rope, cache, 2) is not None
            assert layer.attention_half(torch.cat([x, x]), rope, cache, 2) is None              # a batch
            assert layer.attention_half(torch.cat([x, x], 1), rope, cache, 2) is None           # a prefill
            assert layer.attention_half(x.float(), rope, cache, 2) is None                     # another dtype
            assert layer.attention_half(x, rope, None, 2) is None                               # no KV cache
            assert layer.attention_half(x, rope, cache, 8) is None                              # past the cache
            seen = []
            handle = layer.self_attn.register_forward_hook(lambda m, a, out: seen.append(out.shape))
            assert layer.attention_half(x, rope, cache, 2) is None                              # a hook would miss it
            layer(x, rope, cache, 2)
            assert seen == [(1, 1, model.cfg.hidden_size)]
            handle.remove()
            assert layer.attention_half(x, rope, cache, 2) is not None
        assert layer.attention_half(x, rope, cache, 2) is None                                  # autograd on
    finally:
        model.store.close()


def _double_weight(norm: torch.nn.Module) -> None:
    """Replace the norm's weight by a new parameter, twice it, in new memory (the old one freed)."""
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 2, requires_grad=False)


def test_the_plan_follows_a_moved_weight(tmp_path):
    """A layer's plan holds addresses: a norm weight or linear replaced after the first call is
    read from its new memory (the plan made again), never from the old address."""
    model, layer, cache, rope, x = _first_layer(tmp_path, "int8", 0)
    try:
        with torch.no_grad():
            first = layer.attention_half(x, rope, cache, 0)
            plan = layer._block
            _double_weight(layer.post_attention_layernorm)
            moved = layer.attention_half(x, rope, cache, 0)
            assert layer._block is not plan
            assert torch.equal(moved[0], first[0]) and not torch.equal(moved[1], first[1])
            want = layer.post_attention_layernorm(moved[0]).reshape(1, -1)
            assert torch.equal(moved[1], want)
            # the o projection moved to new memory (the same values): same output, new plan
            o = layer.self_attn.o_proj
            o.codes = o.codes.clone()
            plan = layer._block
            again = layer.attention_half(x, rope, cache, 0)
            assert layer._block is not plan and layer._block.fields[decode_layer._O + 1] == o.codes.data_ptr()
            assert torch.equal(again[0], moved[0])
    finally:
        model.store.close()


def test_a_frozen_cache_checks_the_plan_once_and_the_next_one_again(tmp_path):
    """generate's KV cache is frozen: a layer's plan and the cache are checked on its first decode
    step, not on later ones (the weights do not change while generate runs); a weight moved in
    between is seen by the next frozen cache (the next generate), and by an unfrozen one at once."""
    model, layer, cache, rope, x = _first_layer(tmp_path, "int8", 0)
    cache.frozen = True
    try:
        with torch.no_grad():
            first = layer.attention_half(x, rope, cache, 0)
            plan = layer._block
            _double_weight(layer.post_attention_layernorm)
            same = layer.attention_half(x, rope, cache, 0)
            # not checked again: the old weight read, from its memory kept alive, not freed memory
            assert layer._block is plan and torch.equal(same[1], first[1])
            assert layer.attention_half(x, rope, cache, 8) is None              # pos is, each step
            fresh = model.new_cache(8)
            fresh.frozen = True
            moved = layer.attention_half(x, rope, fresh, 0)
            assert layer._block is not plan and not torch.equal(moved[1], first[1])
            assert torch.equal(moved[1], layer.post_attention_layernorm(moved[0]).reshape(1, -1))
            plan = layer._block
            _double_weight(layer.post_attention_layernorm)
            again = layer.attention_half(x, rope, model.new_cache(8), 0)           # not frozen
            assert layer._block is not plan
            assert torch.equal(again[1], layer.post_attention_layernorm(again[0]).reshape(1, -1))
            # the head: the same, once per frozen cache
            want = model.lm_head(model.norm(x)).float()
            assert torch.equal(model._fused_head(x, fresh), want)
            _double_weight(model.norm)
            assert torch.equal(model._fused_head(x, fresh), want)                   # trusted
            assert torch.equal(model._fused_head(x, model.new_cache(8)), model.lm_head(model.norm(x)).float())
            model.thaw()                                         # generate's end: nothing trusted or kept
            assert layer._trust.serial == 0 == model._head_trust.serial
            assert layer._trust.memory == () == model._head_trust.memory
    finally:
        model.store.close()


def test_generate_checks_its_plans_once_and_thaws_them_at_its_end(tmp_path, monkeypatch):
    """generate's cache is frozen: each layer's fused call is checked on the first decode step
    only; the same tokens as the modules give; at its end nothing is trusted any more."""
    model = small_model(tmp_path, "qwen3_moe", "int4")
    fused, checked = decode_layer.attention_half, []

    def counted(*a, **kw):
        checked.append(kw.get("checked", False))
        return fused(*a, **kw)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    try:
        monkeypatch.setattr(DecoderLayer, "attention_half", lambda *a: None)
        monkeypatch.setattr(CausalLM, "_fused_head", lambda *a: None)
        want = model.generate(ids, 6)
        monkeypatch.undo()
        monkeypatch.setattr(decode_layer, "attention_half", counted)
        got = model.generate(ids, 6)
        layers = model.cfg.num_layers
        assert checked == [False] * layers + [True] * 4 * layers      # 5 decode steps: the last samples only
        assert all(layer._trust.serial == 0 and layer._trust.memory == () for layer in model.layers)
        assert model._head_trust.serial == 0
        assert torch.equal(got, want)
    finally:
        model.store.close()


def test_the_fused_head_leaves_a_hooked_or_batched_model_to_the_modules(tmp_path):
    model = small_model(tmp_path, "qwen3_moe", "int4")
    x = torch.randn(1, 1, model.cfg.hidden_size).to(torch.bfloat16)
    try:
        with torch.no_grad():
            cache = model.new_cache(4)
            want = model.lm_head(model.norm(x)).float()
            assert torch.equal(model._fused_head(x, cache), want)
            assert model._fused_head(torch.cat([x, x]), cache) is None
            handle = model.lm_head.register_forward_hook(lambda m, a, out: None)
            assert model._fused_head(x, cache) is None
            handle.remove()
        assert model._fused_head(x, cache) is None                       # autograd on
    finally:
        model.store.close()


def test_a_decode_steps_rotary_is_kept_and_follows_its_frequencies():
    """Rotary.at keeps each position's cos and sin: the values forward gives for that position,
    computed again when inv_freq is replaced (a model moved or cast) or the dtype differs."""
    from moestream.compute.models.common import ModelConfig, Rotary
    cfg = ModelConfig(family="qwen3_moe", vocab_size=8, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=16, rms_norm_eps=1e-6, num_experts=4, top_k=2, norm_topk_prob=True, moe_layers=(0,),
                      rope_theta=10000.0)
    rotary = Rotary(cfg)
    for p in (0, 7, 4095):
        cos, sin = rotary(torch.tensor([p]))
        got = rotary.at(p, torch.bfloat16)
        assert torch.equal(got[0], cos.to(torch.bfloat16)) and torch.equal(got[1], sin.to(torch.bfloat16))
        assert rotary.at(p, torch.bfloat16)[0] is got[0]                          # kept
    assert torch.equal(rotary.at(7, torch.float32)[0], rotary(torch.tensor([7]))[0])
    rotary.inv_freq = rotary.inv_freq * 2
    cos, _ = rotary(torch.tensor([7]))
    assert torch.equal(rotary.at(7, torch.bfloat16)[0], cos.to(torch.bfloat16))
