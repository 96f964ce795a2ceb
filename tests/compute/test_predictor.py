"""Next-layer probes: the regression, the file, the forward's use of them and the CLI."""
import numpy as np
import pytest
import torch

import moestream
from moestream.cli import main
from moestream.compute import load_model
from moestream.compute.generation import load_tokenizer
from moestream.compute.predictor import (NextLayerProbes, collect, fit_mlp, fit_probes, probe_logits, ridge, score,
                                         token_batches)
from moestream.compute.routing import RoutingRecorder
from moestream.errors import FormatError, UsageError
from moestream.formats.trace import RoutingTrace

TEXT = ("Mixture-of-experts models route every token to a few experts; the rest of the weights "
        "stay on the disk until a router asks for them. ") * 40


@pytest.fixture(scope="module")
def store(checkpoints, tmp_path_factory):
    return moestream.convert(checkpoints["mixtral"], tmp_path_factory.mktemp("probes") / "s", progress=False)


def test_ridge_recovers_a_linear_map_and_its_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    w, b = torch.randn(8, 5, generator=g), torch.randn(5, generator=g)
    fit = ridge(x, x @ w + b, 1e-9)
    assert fit.shape == (9, 5) and fit.dtype == np.float32
    np.testing.assert_allclose(fit[:-1], w.numpy(), atol=1e-4)
    np.testing.assert_allclose(fit[-1], b.numpy(), atol=1e-4)
    # the penalty shrinks the weights, never the bias
    shrunk = ridge(x, x @ w + b, 1e6)
    assert np.abs(shrunk[:-1]).max() < 0.05 and np.allclose(shrunk[-1], (x @ w + b).mean(0).numpy(), atol=0.2)


def test_probes_fit_their_text_at_least_as_well_as_the_router(store):
    model = load_model(store, device_budget="64MiB")
    try:
        batches = token_batches(load_tokenizer(model), [TEXT], tokens=600, length=100)
        assert sum(b.numel() for b in batches) == 600 and all(b.shape[0] == 1 for b in batches)
        probes = fit_probes(model, batches, penalty=1e-6, width=0)
        inputs, logits = collect(model, batches)
        moe = [layer.mlp.layer for layer in model.layers]
        assert sorted(probes.weights) == moe                     # the first MoE layer's too
        # ... fitted on the token's embedding, normed by that layer's post-attention norm
        ids = torch.cat([b.reshape(-1) for b in batches])
        with torch.no_grad():
            emb = model.layers[0].post_attention_layernorm(model.embed_tokens(ids)).float()
        torch.testing.assert_close(inputs[moe[0]], emb)
        for key, x in inputs.items():
            assert x.shape == (600, model.cfg.hidden_size) and logits[key].shape == (600, model.cfg.num_experts)
            gate = model.layers[moe.index(key)].mlp.gate
            w = torch.from_numpy(probes.weights[key])
            with torch.no_grad():
                router_err = (gate(x.to(gate.weight.dtype)).float() - logits[key]).pow(2).mean()
            probe_err = (probe_logits(w, x) - logits[key]).pow(2).mean()
            # the router's guess is one linear map of the same input: least squares does no worse
            assert probe_err <= router_err * 1.001 + 1e-6, (key, probe_err, router_err)
        rows = score(model, probes, inputs, logits)
        assert all(0 <= r["router"] <= 1 and 0 <= r["probe"] <= 1 for r in rows.values())
        assert probes.meta == {"tokens": 600, "ridge": 1e-6}
    finally:
        model.store.close()


def test_a_probe_with_a_hidden_layer_learns_what_a_linear_one_cannot():
    # y = |x| per coordinate: no linear map of x comes near it, one hidden layer does
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g)
    y = torch.cat([x.abs(), -x.abs()], 1)                       # [N, 12]
    hid, out = fit_mlp(x, y, 32, epochs=100)
    assert hid.shape == (7, 32) and out.shape == (33, 12) and hid.dtype == out.dtype == np.float32
    xt = torch.randn(500, 6, generator=g)
    yt = torch.cat([xt.abs(), -xt.abs()], 1)
    mlp_err = (probe_logits([torch.from_numpy(hid), torch.from_numpy(out)], xt) - yt).pow(2).mean()
    lin_err = (probe_logits(torch.from_numpy(ridge(x, y, 1e-6)), xt) - yt).pow(2).mean()
    assert mlp_err < 0.2 * lin_err, (mlp_err, lin_err)
    # deterministic: the same seed gives the same probe
    again = fit_mlp(x, y, 32, epochs=100)
    np.testing.assert_array_equal(again[0], hid)
    np.testing.assert_array_equal(again[1], out)


def test_probes_with_hidden_layers_fit_save_and_guess(store, tmp_path):
    model = load_model(store, device_budget="64MiB")
    try:
        batches = token_batches(load_tokenizer(model), [TEXT], tokens=400, length=100)
        probes = fit_probes(model, batches, width=16)
        assert probes.meta == {"tokens": 400, "hidden": 16, "epochs": 8}
        key = min(probes.weights)
        assert probes.hidden[key].shape == (model.cfg.hidden_size + 1, 16)
        assert probes.weights[key].shape == (17, model.cfg.num_experts)
        probes.save(tmp_path / "p.npz")
        back = NextLayerProbes.load(tmp_path / "p.npz")
        assert back.meta["format"] == "moestream-next-layer-probes/2"
        for a, b in zip(back.maps(key), probes.maps(key)):
            np.testing.assert_array_equal(a, b)
        # the forward guesses with the probe's own maps
        model.use_probes(back)
        x = torch.randn(3, model.cfg.hidden_size)
        mlp = model.moe_layers()[key]
        expected = torch.topk(torch.softmax(probe_logits([torch.from_numpy(m) for m in probes.maps(key)], x), -1),
                              model.cfg.top_k, -1)
        experts, probs = mlp.guess(x)
        assert torch.equal(experts, expected.indices) and torch.allclose(probs, expected.values)
        rows = score(model, back, *collect(model, batches))
        assert all(0 <= r["probe"] <= 1 for r in rows.values())
    finally:
        model.store.close()


def test_probes_file_round_trip_and_errors(tmp_path):
    w = {1: np.arange(5 * 3, dtype=np.float32).reshape(5, 3)}
    p = NextLayerProbes(4, 3, w, {"tokens": 10})
    p.save(tmp_path / "p.npz")
    q = NextLayerProbes.load(tmp_path / "p.npz")
    assert (q.hidden_size, q.num_experts, q.meta["tokens"]) == (4, 3, 10)
    np.testing.assert_array_equal(q.weights[1], w[1])
    assert [f.name for f in tmp_path.iterdir()] == ["p.npz"]          # no temporary file left
    with pytest.raises(ValueError, match="expected float32"):
        NextLayerProbes(4, 3, {1: np.zeros((4, 3), np.float32)})
    with pytest.raises(ValueError, match=r"expected float32 \(9, 3\)"):    # output rows follow the hidden map
        NextLayerProbes(4, 3, {1: np.zeros((5, 3), np.float32)}, hidden={1: np.zeros((5, 8), np.float32)})
    with pytest.raises(ValueError, match="hidden map without an output map"):
        NextLayerProbes(4, 3, {}, hidden={1: np.zeros((5, 8), np.float32)})
    # a file of the first format (linear probes only) is still read
    np.savez(tmp_path / "v1.npz", meta=np.array('{"format": "moestream-next-layer-probes/1", "hidden_size": 4, '
                                                '"num_experts": 3}'), layer_1=w[1])
    assert NextLayerProbes.load(tmp_path / "v1.npz").maps(1)[0].shape == (5, 3)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(FormatError, match="junk.npz: not a next-layer probes file"):
        NextLayerProbes.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", meta=np.array('{"format": "something else"}'))
    with pytest.raises(FormatError, match="other.npz: not a next-layer probes file"):
        NextLayerProbes.load(tmp_path / "other.npz")
    with pytest.raises(UsageError, match="missing.npz: no such probes file"):
        NextLayerProbes.load(tmp_path / "missing.npz")
    with pytest.raises(FormatError, match="hidden size 4 and 3 experts, the model has 8 and 3"):
        q.check(8, 3, [0, 1], "here")
    with pytest.raises(FormatError, match=r"layers \[1\], which are not MoE layers"):
        q.check(4, 3, [0, 2], "here")


def test_the_forward_guesses_with_the_probes(store, tmp_path):
    model = load_model(store, device_budget="64MiB")
    try:
        cfg, layers = model.cfg, [layer.mlp.layer for layer in model.layers]
        favourite = [3, 5][:cfg.top_k]
        w = np.zeros((cfg.hidden_size + 1, cfg.num_experts), np.float32)
        w[-1, favourite] = 50.0                                   # a bias no input can outvote
        model.use_probes(NextLayerProbes(cfg.hidden_size, cfg.num_experts, {layers[1]: w}))

        def guesses():
            rec = RoutingRecorder(model.store.index.moe_layers, cfg.num_experts, cfg.top_k)
            model.record_routing(rec)
            with torch.no_grad():
                model(torch.tensor([[1, 17, 33, 5, 90, 7]]))
            model.record_routing(None)
            return rec.trace()
        t = guesses()
        assert t.guess_width == model.guess_width == cfg.top_k
        model.guess_width = cfg.top_k + 1                         # load_model(extra_guesses=1)
        t = guesses()
        # the top-k of the guess are the probe's favourites, the extra guess is another expert
        assert (np.sort(t.predicted[:, 1, :cfg.top_k], -1) == sorted(favourite)).all()
        assert (t.confidence[:, 1, :cfg.top_k] > 0.99 / cfg.top_k).all()
        assert not np.isin(t.predicted[:, 1, cfg.top_k:], favourite).any()
        model.use_probes(None)                                    # back to the router's guess
        assert not (np.sort(guesses().predicted[:, 1, :cfg.top_k], -1) == sorted(favourite)).all()
        model.guess_width = 1
        assert guesses().guess_width == 1
        with pytest.raises(FormatError, match="the model has"):
            model.use_probes(NextLayerProbes(cfg.hidden_size + 1, cfg.num_experts,
                                             {layers[1]: np.zeros((cfg.hidden_size + 2, cfg.num_experts), np.float32)}))
    finally:
        model.store.close()


def test_cli_fits_probes_and_generate_uses_them(store, tmp_path, capsys):
    (tmp_path / "fit.txt").write_text(TEXT)
    (tmp_path / "held.txt").write_text(TEXT[::-1])
    out = tmp_path / "probes.npz"
    assert main(["fit-predictor", str(store), "--text", str(tmp_path / "fit.txt"), "--held-out",
                 str(tmp_path / "held.txt"), "--tokens", "300", "-o", str(out)]) == 0
    cap = capsys.readouterr()
    text = cap.out
    # every stage has its progress bar (issue 26 item 7)
    assert all(f"fit-predictor: {stage}" in cap.err for stage in ("run the model", "fit the probes", "held-out text"))
    assert f"wrote {out}" in text and "fitted on 300 tokens" in text
    assert "on the fitting text (router guess -> probe): layer 0:" in text and ", layer 1:" in text
    assert "on the held-out text" in text
    assert NextLayerProbes.load(out).meta["tokens"] == 300
    assert main(["generate", str(store), "--prompt", "Experts", "--max-new-tokens", "3", "--prefetch",
                 "--predictor", str(out), "--trace", str(tmp_path / "t.npz"), "--extra-guesses", "1"]) == 0
    capsys.readouterr()
    trace = RoutingTrace.load(tmp_path / "t.npz")
    assert trace.guess_width == trace.top_k + 1 and (trace.predicted >= 0).all()
    # --predictor alone brings --prefetch with it (it would do nothing otherwise), and says so
    assert main(["generate", str(store), "--prompt", "Experts", "--max-new-tokens", "3", "--predictor", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--predictor implies --prefetch" in err
    assert main(["generate", str(store), "--prompt", "x", "--extra-guesses", "-1"]) == 2
    assert "extra_guesses=-1: must lie in 0.." in capsys.readouterr().err
    # user mistakes: one line, no traceback
    assert main(["fit-predictor", str(store), "--text", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "p2.npz")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert main(["fit-predictor", str(store), "--text", str(tmp_path / "fit.txt"), "--hidden", "-1", "-o", str(out)]) == 2
    assert "--hidden" in capsys.readouterr().err
    assert main(["generate", str(store), "--prompt", "x", "--predictor", str(tmp_path / "held.txt")]) == 1
    assert "held.txt: not a next-layer probes file" in capsys.readouterr().err
