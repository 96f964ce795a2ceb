"""The server's scheduler (serving/scheduler.py) without HTTP: a lone stream decodes as generate
does (a frozen KV cache, the experts' lease where the store holds every expert), streams that
share steps get generate's tokens each, and close leaves the model as it found it."""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from moestream.bench.decode import load_every_expert
from moestream.compute import decode_layer
from moestream.serving.scheduler import BatchScheduler, GenerationRequest

from ..compute.decode_steps import counting_leased, small_model


class _Tokens:
    """A tokenizer stand-in: the scheduler decodes ids to text to emit it; the tests compare ids."""

    def decode(self, ids):
        return " ".join(map(str, ids))


@contextlib.contextmanager
def _serving(model):
    # a scheduler serving `model`, closed on the way out
    sched = BatchScheduler(model, _Tokens())
    try:
        yield sched
    finally:
        sched.close()


def _serve(sched: BatchScheduler, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    # submits every prompt at once; each request's produced ids once it is done
    done = [threading.Event() for _ in prompts]
    reqs = []
    for p, n, ev in zip(prompts, max_tokens, done):
        def emit(kind, value, ev=ev):
            assert kind != "error", value
            if kind == "done":
                ev.set()
        reqs.append(GenerationRequest(p, n, emit))
    for r in reqs:
        sched.submit(r)
    for ev in done:
        assert ev.wait(120)
    return [r.produced for r in reqs]


def _counting_fused(monkeypatch) -> tuple[list, list]:
    # `checked` of each fused attention call (True: a frozen cache trusted since an earlier step),
    # and one entry per fused head call
    attention, heads = [], []
    real_attention, real_head = decode_layer.attention_half, decode_layer.head

    def attention_half(*a, checked=False, **k):
        attention.append(checked)
        return real_attention(*a, checked=checked, **k)
    monkeypatch.setattr(decode_layer, "attention_half", attention_half)
    monkeypatch.setattr(decode_layer, "head", lambda *a: heads.append(1) or real_head(*a))
    return attention, heads


@pytest.mark.parametrize("quant", ["int4", "keep"])
def test_a_lone_stream_decodes_through_the_lease_with_generates_tokens(tmp_path, monkeypatch, quant):
    model = small_model(tmp_path, "qwen3_moe", quant)
    store = model.store
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    try:
        load_every_expert(store)                # a resident store: every expert in L1, as bench decode's
        before = store.stats()
        want = model.generate(prompt, 12)[0, 6:].tolist()
        in_generate = {k: store.stats()[k] - before[k] for k in ("requests", "hits_l1", "misses")}
        calls = counting_leased(monkeypatch)
        attention, heads = _counting_fused(monkeypatch)
        with _serving(model) as sched:
            before = store.stats()
            got = _serve(sched, [prompt[0].tolist()], [12])[0]
            counted = {k: store.stats()[k] - before[k] for k in ("requests", "hits_l1", "misses")}
            served, fused = list(calls), (list(attention), len(heads))
            assert model._lease is not None and sched._lease is model._lease      # held across requests
        assert model._lease is None and all(layer._leased is None for layer in model.layers)
        assert not any(store.arena.pinned(i) for i in range(store.arena.count))
        # the fused calls trust no frozen cache after close: generate checks its own again
        assert model._head_trust.serial == 0 and all(layer._trust.serial == 0 for layer in model.layers)
        assert model.generate(prompt, 12)[0, 6:].tolist() == want
    finally:
        store.close()
    assert got == want
    # 11 decode steps (the first token comes from the prefill), each layer's experts in one leased
    # call that found every expert, and the store's counts those of generate (prefill and steps)
    assert served == [(model.cfg.top_k, True)] * (11 * model.cfg.num_layers)
    # each step's attention halves and head fused, the frozen cache checked on its first step only
    layers = model.cfg.num_layers
    assert fused == ([False] * layers + [True] * (10 * layers), 11)
    assert counted == in_generate and in_generate["misses"] == 0


def test_streams_sharing_steps_then_one_alone_each_get_generates_tokens(tmp_path, monkeypatch):
    # the short request leaves the batch after 3 tokens; the long one then decodes alone (its
    # frozen cache trusted from its first lone step, the lease taken then)
    model = small_model(tmp_path, "qwen3_moe", "int8")
    store = model.store
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, model.cfg.vocab_size, (1, n), generator=g) for n in (5, 8)]
    try:
        load_every_expert(store)
        want = [model.generate(p, n)[0, p.shape[1]:].tolist() for p, n in zip(prompts, (3, 14))]
        calls = counting_leased(monkeypatch)
        with _serving(model) as sched:
            got = _serve(sched, [p[0].tolist() for p in prompts], [3, 14])
        assert not any(store.arena.pinned(i) for i in range(store.arena.count))
    finally:
        store.close()
    assert got == want
    assert calls and all(done for _, done in calls)           # some steps of the long one alone, leased


def test_a_store_with_fewer_slots_than_experts_serves_a_lone_stream_without_a_lease(tmp_path):
    model = small_model(tmp_path, "qwen3_moe", "int4", device_budget="40KiB")
    store = model.store
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    try:
        assert store.expert_slots < model.cfg.num_experts * len(model.moe_layers())
        want = model.generate(prompt, 10)[0, 6:].tolist()
        with _serving(model) as sched:
            got = _serve(sched, [prompt[0].tolist()], [10])[0]
            assert sched._lease is None and model._lease is None
        assert not any(store.arena.pinned(i) for i in range(store.arena.count))
    finally:
        store.close()
    assert got == want
