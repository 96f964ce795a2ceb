"""`generate --trace` records what the router chose: checked against transformers' own router
logits for the same tokens, and against the Store's request counter."""
import io

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import moestream
from moestream.compute.generation import generate_text
from moestream.formats.trace import RoutingTrace


@pytest.fixture(scope="module")
def store(checkpoints, tmp_path_factory):
    return moestream.convert(checkpoints["mixtral"], tmp_path_factory.mktemp("trace") / "s", progress=False)


def test_the_trace_holds_transformers_routing_and_the_predictors_guesses(checkpoints, store, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    report = generate_text(str(store), "Experts stream", max_new_tokens=12, device_budget=4 * 36864, host_budget=0,
                           trace=str(tmp_path / "t.npz"), out=out, err=err, extra_guesses=1)
    assert "routing trace written to" in err.getvalue()
    t = RoutingTrace.load(tmp_path / "t.npz")
    prompt = report["prompt_tokens"]
    # the prefill is step 0; each decode step feeds one token (the last produced is never fed)
    assert t.tokens == prompt + report["new_tokens"] - 1
    assert np.array_equal(t.step, np.r_[np.zeros(prompt, int), np.arange(1, report["new_tokens"])])
    assert sum(len(c) for _, c, _ in t.requests()) == report["stats"]["requests"]

    # the same recording through the API, against transformers' routers on the same tokens
    from moestream.compute import load_model
    from moestream.compute.routing import RoutingRecorder
    ref = AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"], dtype=torch.float32).eval()
    model = load_model(store, device_budget=4 * 36864, host_budget=0)
    try:
        rec = RoutingRecorder(model.store.index.moe_layers, model.cfg.num_experts, model.cfg.top_k)
        model.record_routing(rec)
        ids = model.generate(torch.tensor([[1, 17, 33, 5, 90]]), 10)
        t2 = rec.trace()
    finally:
        model.store.close()
    assert t2.tokens == ids.shape[1] - 1
    with torch.no_grad():
        o = ref(ids[:, :-1], output_router_logits=True)
    for layer, logits in enumerate(o.router_logits):
        want = logits.topk(2, dim=-1).indices.sort(dim=-1).values.numpy()
        assert np.array_equal(np.sort(t2.experts[:, layer], axis=-1), want)
    # layer 1's experts were guessed from layer 0's residual, layer 0's from the token's embedding:
    # transformers' layer-0 router on its own embedding, normed by its layer-0 post-attention norm
    assert t.predicted is not None and (t.predicted >= 0).all() and t.guess_width == 3
    assert ((t.confidence > 0) & (t.confidence <= 1)).all() and (np.diff(t.confidence, axis=-1) <= 0).all()
    with torch.no_grad():
        first = ref.model.layers[0]
        logits = first.mlp.gate(first.post_attention_layernorm(ref.model.embed_tokens(ids[:, :-1]))[0])
        logits = logits[0] if isinstance(logits, tuple) else logits       # transformers' router returns a tuple
    assert t2.guess_width == 2 and np.array_equal(t2.predicted[:, 0], logits.topk(2, dim=-1).indices.numpy())
