"""A decode token's routed experts read in place in one call when L1 holds them all
(compute/decode_moe.py) against the general path (models/common.py: stream_experts): the same
logits bit for bit, the same store counts, the general path wherever an expert misses; and the
router's softmax top-k in one call (decode_ops.softmax_topk) against torch's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moestream.bench.decode import load_every_expert
from moestream.compute import decode_moe, decode_ops
from moestream.compute.models import common

from .decode_steps import counting_leased, decode_logits, small_model


def _counting(monkeypatch) -> list:
    calls, real = [], decode_moe._moe_decode
    monkeypatch.setattr(decode_moe, "_moe_decode", lambda *a: calls.append(len(a[5])) or real(*a))
    return calls


def _general_only(monkeypatch) -> None:
    monkeypatch.setattr(common, "held_decode_output", lambda *a, **k: None)


@pytest.mark.parametrize("family,quant", [("qwen3_moe", "keep"), ("qwen3_moe", "int8"), ("qwen3_moe", "int4"),
                                          ("mixtral", "int4"), ("mixtral", "keep")])
def test_resident_decode_takes_one_call_a_layer_with_the_general_paths_logits_and_counts(tmp_path, monkeypatch,
                                                                                         family, quant):
    model = small_model(tmp_path, family, quant)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    try:
        decode_logits(model, ids, 16)                   # every expert the steps route to lands in L1
        with monkeypatch.context() as m:
            _general_only(m)
            before = model.store.stats()
            want = decode_logits(model, ids, 16)
            general = {k: model.store.stats()[k] - before[k] for k in ("requests", "hits_l1", "misses")}
        calls = _counting(monkeypatch)
        before = model.store.stats()
        got = decode_logits(model, ids, 16)
        fast = {k: model.store.stats()[k] - before[k] for k in ("requests", "hits_l1", "misses")}
        assert not any(model.store.arena.pinned(i) for i in range(model.store.arena.count))
    finally:
        model.store.close()
    # every decode step of every layer (not the prefill) in one call of its top-k experts
    assert calls == [model.cfg.top_k] * (12 * model.cfg.num_layers)
    assert torch.equal(got, want)
    assert fast == general and general["misses"] == 0


def _leased_logits(model, ids: torch.Tensor, steps: int, lease: bool) -> torch.Tensor:
    # decode_logits in a frozen cache with the experts leased after the prefill, as generate leases them
    cache = model.new_cache(steps + 8)
    cache.frozen = True
    taken = None
    with torch.no_grad():
        try:
            out = [model(ids[:, :4], cache, 0)[:, -1]]
            if lease:
                taken = model.lease_experts()
            out += [model(ids[:, p:p + 1], cache, p)[:, -1] for p in range(4, steps)]
        finally:
            model.thaw()
            model.release_lease(taken)
    return torch.stack(out)


@pytest.mark.parametrize("family,quant", [("qwen3_moe", "keep"), ("qwen3_moe", "int8"), ("qwen3_moe", "int4"),
                                          ("mixtral", "int4")])
def test_leased_decode_routes_and_computes_in_one_call_with_the_general_paths_logits_and_counts(tmp_path, monkeypatch,
                                                                                                family, quant):
    model = small_model(tmp_path, family, quant)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    store = model.store
    try:
        load_every_expert(store)
        runs = {}
        for lease in (False, True):
            with monkeypatch.context() as m:
                calls = counting_leased(m)
                before = store.stats()
                logits = _leased_logits(model, ids, 16, lease)
            runs[lease] = logits, list(calls), {k: store.stats()[k] - before[k] for k in ("requests", "hits_l1", "misses")}
            assert not any(store.arena.pinned(i) for i in range(store.arena.count))     # released at thaw
            assert model._lease is None and all(layer._leased is None for layer in model.layers)
        (want, none, general), (got, calls, leased) = runs[False], runs[True]
        # and generate, which leases by itself (every decode step after the first token's prefill):
        # the same tokens as with the lease refused, and nothing left pinned
        with monkeypatch.context() as m:
            in_generate = counting_leased(m)
            tokens = model.generate(ids[:, :4], 12)
        assert in_generate == [(model.cfg.top_k, True)] * (11 * model.cfg.num_layers)
        assert model._lease is None and not any(store.arena.pinned(i) for i in range(store.arena.count))
        monkeypatch.setattr(model, "lease_experts", lambda: None)
        assert torch.equal(model.generate(ids[:, :4], 12), tokens)
    finally:
        store.close()
    assert none == [] and calls == [(model.cfg.top_k, True)] * (12 * model.cfg.num_layers)
    assert torch.equal(got, want)
    assert leased == general and general["misses"] == 0


def test_a_lease_without_an_expert_leaves_that_step_to_the_general_path_and_takes_it_in(tmp_path, monkeypatch):
    # a store whose L1 has a slot for every expert but holds few of them yet: the steps that route
    # to one it lacks take the general path (loading it), the lease takes it in after; logits and
    # counts as the general path's throughout
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    runs = {}
    for lease in (False, True):
        model = small_model(tmp_path / str(lease), "qwen3_moe", "int4")
        try:
            for e in range(2):
                model.store.get(0, e)
            refreshed = []
            real = decode_moe.LeasedLayer.refresh
            with monkeypatch.context() as m:
                m.setattr(decode_moe.LeasedLayer, "refresh", lambda self: refreshed.append(self.layer) or real(self))
                calls = counting_leased(m)
                logits = _leased_logits(model, ids % model.cfg.vocab_size, 24, lease)
            stats = model.store.stats()
            runs[lease] = logits, list(calls), refreshed, {k: stats[k] for k in ("requests", "hits_l1", "misses")}
            assert not any(model.store.arena.pinned(i) for i in range(model.store.arena.count))
        finally:
            model.store.close()
    (want, none, no_refresh, general), (got, calls, refreshed, leased) = runs[False], runs[True]
    assert none == [] and no_refresh == []
    done = [ok for _, ok in calls]
    assert len(done) == 20 * 2 and 0 < sum(done) < len(done)    # some steps leased, some missed
    assert len(refreshed) == len(done) - sum(done)            # each miss loaded, then taken in
    assert leased["misses"] > 0 and leased == general
    assert torch.equal(got, want)


def test_a_route_replaced_on_the_instance_chooses_for_the_lease_as_for_the_per_step_path(tmp_path, monkeypatch):
    # bench decode replays a routing trace by replacing each MoE's route: the leased steps must
    # read the experts it chooses (not the router's), with the per-step path's logits and counts
    model = small_model(tmp_path, "qwen3_moe", "int4")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    store, k = model.store, model.cfg.top_k
    rng = np.random.default_rng(0)
    choice = {layer: rng.permutation(model.cfg.num_experts)[:k].tolist() for layer in model.moe_layers()}

    def forced(mlp):
        def route(x, logits=None):
            experts = torch.tensor([choice[mlp.layer]] * x.shape[0])
            return torch.full(experts.shape, 1.0 / k, dtype=x.dtype), experts
        return route
    try:
        load_every_expert(store)
        own = _leased_logits(model, ids, 12, lease=True)
        for mlp in model.moe_layers().values():
            mlp.route = forced(mlp)
        runs = {}
        for lease in (False, True):
            with monkeypatch.context() as m:
                calls = _counting(m)
                leased_calls = counting_leased(m)
                before = store.stats()
                logits = _leased_logits(model, ids, 12, lease)
            runs[lease] = logits, list(calls), list(leased_calls), \
                {key: store.stats()[key] - before[key] for key in ("requests", "hits_l1", "misses")}
    finally:
        store.close()
    (want, per_step, none, general), (got, calls, not_called, leased) = runs[False], runs[True]
    assert none == [] and not_called == []                  # the router's top-k is not what chooses
    assert per_step == calls == [k] * (8 * model.cfg.num_layers)
    assert torch.equal(got, want) and leased == general
    assert not torch.equal(got, own)                        # the replaced route, not the router, chose


def test_no_lease_while_routing_is_recorded_or_guessed_ahead_nor_for_a_shared_expert_or_a_small_l1(tmp_path):
    from moestream.compute.routing import RoutingRecorder
    model = small_model(tmp_path / "q3", "qwen3_moe", "int4")
    try:
        lease = model.lease_experts()
        assert model._lease is lease and all(layer._leased is not None for layer in model.layers)
        assert model.lease_experts() is None             # another generate of the model meanwhile: none
        model.release_lease(None)
        model.thaw()
        assert model._lease is lease                      # only its taker releases it
        model.release_lease(lease)
        assert model._lease is None and all(layer._leased is None for layer in model.layers)
        model.prefetch_next_layer = True
        model.lease_experts()
        assert model._lease is None
        model.prefetch_next_layer = False
        model.record_routing(RoutingRecorder(tuple(model.moe_layers()), model.cfg.num_experts, model.cfg.top_k))
        model.lease_experts()
        assert model._lease is None
    finally:
        model.store.close()
    model = small_model(tmp_path / "q2", "qwen2_moe", "int4")      # SharedExpertMoE: its own forward
    try:
        lease = model.lease_experts()
        assert model._lease is lease and all(layer._leased is None for layer in model.layers)
        model.release_lease(lease)
    finally:
        model.store.close()
    probe = small_model(tmp_path / "probe", "qwen3_moe", "int4")
    slot = probe.store.arena.slot_size
    probe.store.close()
    model = small_model(tmp_path / "small", "qwen3_moe", "int4", device_budget=4 * slot)
    try:
        model.lease_experts()
        assert model._lease is None
    finally:
        model.store.close()


def test_a_miss_leaves_the_step_to_the_general_path_with_nothing_counted_twice(tmp_path, monkeypatch):
    probe = small_model(tmp_path / "probe", "qwen3_moe", "int4")
    slot = probe.store.arena.slot_size
    probe.store.close()
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    runs = {}
    for name in ("general", "fast"):
        # four slots for a layer's eight experts (top-2 of two layers): hits and misses mixed
        model = small_model(tmp_path / name, "qwen3_moe", "int4", device_budget=4 * slot)
        try:
            with monkeypatch.context() as m:
                if name == "general":
                    _general_only(m)
                calls = _counting(m)
                logits = decode_logits(model, ids % model.cfg.vocab_size, 24)
            stats = model.store.stats()
            runs[name] = logits, calls, {k: stats[k] for k in ("requests", "hits_l1", "misses")}
        finally:
            model.store.close()
    (want, none, general), (got, calls, fast) = runs["general"], runs["fast"]
    assert none == [] and 0 < len(calls) < 20 * 2      # some steps held whole, some missed
    assert fast["misses"] > 0 and fast == general
    assert torch.equal(got, want)


def test_the_one_call_leaves_what_it_cannot_take_to_the_general_path(tmp_path):
    model = small_model(tmp_path, "qwen3_moe", "int4")
    store, layer = model.store, 0
    names, hidden = model.cfg.expert_names, model.cfg.hidden_size
    try:
        x = torch.randn(1, hidden).to(torch.bfloat16)
        experts = torch.tensor([[1, 5]])
        weights = torch.tensor([[0.75, 0.25]]).to(torch.bfloat16)
        for e in range(model.cfg.num_experts):
            store.get(layer, e)
        assert decode_moe.held_decode_output(store, layer, names, x, weights, experts) is not None
        assert decode_moe.held_decode_output(store, layer, names, torch.cat([x, x]), weights.repeat(2, 1),
                                             experts.repeat(2, 1)) is None            # two tokens
        assert decode_moe.held_decode_output(store, layer, names, x.half(), weights, experts) is None
        assert decode_moe.held_decode_output(store, layer, names, x, weights, torch.tensor([[3, 3]])) is None
        assert decode_moe.held_decode_output(store, layer, names, x, weights, torch.tensor([[3, 8]])) is None
        assert decode_moe.held_decode_output(store, layer, ("gate", "up", "nope"), x, weights, experts) is None
        assert decode_moe.held_decode_output(store, 99, names, x, weights, experts) is None      # no such layer
        assert decode_moe.held_decode_output(store, layer, names, x, weights[:, :1], experts) is None
        assert decode_moe.held_decode_output(store, layer, names, x, weights[0], experts[0]) is None
        # weights of another dtype or layout are rounded as the general path rounds them
        for w in (torch.tensor([[0.7, 0.3]]), torch.tensor([[0.7, 0.3]]).half(), torch.tensor([[0.3, 0.7]]).flip(1)):
            got, _ = decode_moe.held_decode_output(store, layer, names, x, w, experts)
            want, _ = common.routed_experts_output(store, layer, names, torch.cat([x, x]), w.repeat(2, 1),
                                                   experts.repeat(2, 1))
            assert torch.equal(got, want[:1])
        assert not any(store.arena.pinned(i) for i in range(store.arena.count))
        # a float32 token gives the general path's float32 output
        xf = x.float()
        got, _ = decode_moe.held_decode_output(store, layer, names, xf, weights, experts)
        want, _ = common.routed_experts_output(store, layer, names, torch.cat([xf, xf]), weights.repeat(2, 1),
                                               experts.repeat(2, 1))
        assert got.dtype == torch.float32 and torch.equal(got, want[:1])
        # with a residual: residual + the output, added as torch adds them (bf16: rounded once)
        for dtype in (torch.bfloat16, torch.float32):
            xr, res = x.to(dtype), torch.randn(1, 1, hidden).to(dtype)
            alone, _ = decode_moe.held_decode_output(store, layer, names, xr, weights, experts)
            added, _ = decode_moe.held_decode_output(store, layer, names, xr, weights, experts, residual=res)
            assert added.dtype == dtype and torch.equal(added.view(res.shape), res + alone.view(res.shape))
        assert decode_moe.held_decode_output(store, layer, names, x, weights, experts,
                                             residual=torch.randn(1, 1, hidden)) is None      # another dtype
        assert not any(store.arena.pinned(i) for i in range(store.arena.count))
    finally:
        store.close()


def test_a_decode_step_with_autograd_on_takes_the_modules_and_the_one_call_alike(tmp_path, monkeypatch):
    model = small_model(tmp_path, "qwen3_moe", "int4")
    calls = _counting(monkeypatch)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6))
    try:
        want = decode_logits(model, ids, 6)
        cache = model.new_cache(8)
        with torch.no_grad():
            model(ids[:, :4], cache, 0)
        calls.clear()
        got = torch.stack([model(ids[:, p:p + 1], cache, p)[:, -1] for p in (4, 5)])   # autograd on
    finally:
        model.store.close()
    assert calls == [model.cfg.top_k] * (2 * model.cfg.num_layers)
    # the router's weights require grad there: the one call reads them detached (no error); the
    # fused attention half leaves such steps to the modules, whose rounding it matches
    torch.testing.assert_close(got.detach(), want[1:], rtol=0, atol=0)


def test_a_hook_on_the_moe_sees_its_output_without_the_residual(tmp_path):
    model = small_model(tmp_path, "qwen3_moe", "int4")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    seen = []
    try:
        want = decode_logits(model, ids, 8)
        mlp = model.layers[0].mlp
        handle = mlp.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out.clone())))
        got = decode_logits(model, ids, 8)
        handle.remove()
        x, out = seen[-1]                                # the last decode step's MoE input and output
        w, e = mlp.route(x)
        alone, _ = common.routed_experts_output(model.store, mlp.layer, model.cfg.expert_names, x, w, e)
    finally:
        model.store.close()
    assert torch.equal(got, want) and len(seen) == 1 + 4
    assert out.shape == x.shape == (1, model.cfg.hidden_size) and torch.equal(out, alone)


def test_a_kernel_failure_unpins_the_slots(tmp_path, monkeypatch):
    model = small_model(tmp_path, "qwen3_moe", "int4")
    store = model.store
    try:
        for e in range(model.cfg.num_experts):
            store.get(0, e)

        def fails(*a):
            raise RuntimeError("kernel failed")
        monkeypatch.setattr(decode_moe, "_moe_decode", fails)
        with pytest.raises(RuntimeError, match="kernel failed"):
            decode_moe.held_decode_output(store, 0, model.cfg.expert_names, torch.randn(1, model.cfg.hidden_size),
                                          torch.tensor([[0.5, 0.5]]), torch.tensor([[0, 1]]))
        assert not any(store.arena.pinned(i) for i in range(store.arena.count))
    finally:
        store.close()


# ---- the router's softmax top-k ------------------------------------------------------------------


def _torch_route(logits: torch.Tensor, k: int, renorm: bool):
    weights, experts = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if renorm else weights), experts


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(2, 160)),
              elements=st.floats(-30, 30, width=32)), st.data(), st.booleans())
def test_softmax_topk_chooses_and_weighs_as_torch(logits, data, renorm):
    k = data.draw(st.integers(1, logits.shape[1]))
    lg = torch.from_numpy(logits)
    got_w, got_e = decode_ops.softmax_topk(lg, k, renorm)
    want_w, want_e = _torch_route(lg, k, renorm)
    assert got_w.dtype == torch.float32 and got_e.dtype == torch.int64 and got_e.shape == (logits.shape[0], k)
    # the weights agree to float32 rounding; the choice wherever no two candidates' probabilities
    # lie within that rounding of each other (near ties may order differently, equal ones go in
    # index order here)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-7)
    p = torch.softmax(lg, -1)
    for r in range(logits.shape[0]):
        ranked = torch.sort(p[r], descending=True).values
        n = min(k, len(ranked) - 1)                      # the gaps between the chosen and past the last
        if bool((ranked[:n] - ranked[1:n + 1] > 1e-5 * ranked[:n]).all()):
            assert got_e[r].tolist() == want_e[r].tolist()
        assert len(set(got_e[r].tolist())) == k
        chosen = p[r][got_e[r]]
        assert bool((chosen[:-1] >= chosen[1:] * (1 - 1e-5)).all())                  # largest first


def test_softmax_topk_takes_equal_probabilities_in_index_order_and_leaves_the_rest_to_torch():
    w, e = decode_ops.softmax_topk(torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]]), 2, True)
    assert e.tolist() == [[1, 2]] and w.tolist() == [[0.5, 0.5]]
    lg = torch.randn(2, 8)
    assert decode_ops.softmax_topk(lg.half(), 2, True) is None
    assert decode_ops.softmax_topk(lg.double(), 2, True) is None
    assert decode_ops.softmax_topk(lg, 9, True) is None and decode_ops.softmax_topk(lg, 0, True) is None
    assert decode_ops.softmax_topk(lg.reshape(2, 2, 4), 2, True) is None
    assert decode_ops.softmax_topk(torch.randn(decode_ops.MAX_FUSED_ROWS + 1, 8), 2, True) is None
    assert decode_ops.softmax_topk(lg.requires_grad_(), 2, True) is None
    with torch.no_grad():
        assert decode_ops.softmax_topk(lg, 2, True) is not None


def test_loading_a_cpu_model_warms_the_decode_kernels_and_lays_out_every_layer_without_reading(tmp_path):
    from moestream.compute import decode_layer
    model = small_model(tmp_path, "qwen3_moe", "int4")
    try:
        stats = model.store.stats()
        assert decode_moe._kernel_warm and decode_layer._kernels_warm
        tables = decode_moe._TABLES[model.store]
        assert sorted(layer for layer, _ in tables) == sorted(model.moe_layers())
        assert all(t is not None and t.offsets.shape == (model.cfg.num_experts, 9) for t in tables.values())
        assert stats["requests"] == stats["reads"] == 0
    finally:
        model.store.close()
