"""Routing traces and profiles: round trips, hand-checked statistics, and clear errors."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moestream.errors import FormatError
from moestream.formats.profile import (build_profile, coverage_curve, hot_experts, load_profile,
                                       predictor_quality, reuse_distances, save_profile)
from moestream.formats.trace import RoutingTrace


def trace_of(experts, steps=None, predicted=None, confidence=None, num_experts=4):
    e = np.asarray(experts, np.int64)
    n = e.shape[0]
    return RoutingTrace(tuple(range(e.shape[1])), num_experts, np.arange(n) if steps is None else np.asarray(steps),
                        e, np.full(e.shape, 0.5, np.float32),
                        None if predicted is None else np.asarray(predicted, np.int64), {"k": 1},
                        None if confidence is None else np.asarray(confidence, np.float32))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 12), layers=st.integers(1, 4), k=st.integers(1, 3), seed=st.integers(0, 99),
       guesses=st.booleans(), width=st.integers(1, 5))
def test_a_trace_survives_a_round_trip(tmp_path_factory, n, layers, k, seed, guesses, width):
    rng = np.random.default_rng(seed)
    e = rng.integers(0, 8, (n, layers, k))
    p = rng.integers(-1, 8, (n, layers, width)) if guesses else None      # a guess may name more or fewer than k
    c = rng.random((n, layers, width)).astype(np.float32) if guesses else None
    t = RoutingTrace(tuple(range(layers)), 8, np.sort(rng.integers(0, 5, n)), e,
                     rng.random((n, layers, k)).astype(np.float32), p, {"seed": seed}, c)
    path = tmp_path_factory.mktemp("t") / "t.npz"
    t.save(path)
    u = RoutingTrace.load(path)
    assert u.layers == t.layers and u.num_experts == 8 and u.meta == {"seed": seed}
    assert np.array_equal(u.step, t.step) and np.array_equal(u.experts, t.experts)
    assert np.allclose(u.weights, t.weights, atol=1e-3)        # stored as float16
    assert (u.predicted is None) == (not guesses)
    if guesses:
        assert np.array_equal(u.predicted, p) and np.allclose(u.confidence, c, atol=1e-3)


def test_requests_merge_the_rows_of_a_step_and_filter_guesses_by_confidence():
    # step 0 is a 2-token prefill, step 1 one decode token; 2 layers, top-1
    t = trace_of([[[0], [1]], [[2], [1]], [[0], [3]]], steps=[0, 0, 1],
                 predicted=[[[-1], [1]], [[-1], [2]], [[-1], [3]]], confidence=[[[0], [0.9]], [[0], [0.1]], [[0], [0.5]]])
    assert list(t.requests()) == [(0, [0, 2], None), (1, [1], [1, 2]), (0, [0], None), (1, [3], [3])]
    assert list(t.requests(threshold=0.5)) == [(0, [0, 2], None), (1, [1], [1]), (0, [0], None), (1, [3], [3])]


def test_bad_traces_are_refused_naming_the_file(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="x.npz"):
        RoutingTrace.load(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", a=np.zeros(3))
    with pytest.raises(FormatError, match="y.npz: not a moestream routing trace"):
        RoutingTrace.load(tmp_path / "y.npz")
    with pytest.raises(FormatError, match="outside"):
        trace_of([[[5]]])
    with pytest.raises(FormatError, match="not in order"):
        trace_of([[[0]], [[1]]], steps=[1, 0])
    with pytest.raises(FormatError, match="guessed expert ids outside -1..3"):
        trace_of([[[0]]], predicted=[[[4]]])
    with pytest.raises(FormatError, match=r"predicted has shape \(1, 2, 1\), expected \[1, 1, G\]"):
        trace_of([[[0]]], predicted=[[[1], [2]]])
    # saved guesses of a bad shape: the reader names the file
    t = trace_of([[[0]]], predicted=[[[1, 2]]])
    t.save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz") as z:
        arrays = dict(z)
    arrays["predicted"] = np.zeros((1, 1, 0), np.int16)
    np.savez(tmp_path / "g.npz", **arrays)
    with pytest.raises(FormatError, match="g.npz: trace: predicted has shape"):
        RoutingTrace.load(tmp_path / "g.npz")


def test_profile_statistics_by_hand(tmp_path):
    # one layer, top-1: expert 0 at steps 0, 1, 3; expert 1 at step 2
    t = trace_of([[[0]], [[0]], [[1]], [[0]]])
    assert reuse_distances(t, 0).tolist() == [1, 2]
    p = build_profile([t], ["t.npz"])
    assert p["counts"] == [[3, 1, 0, 0]]
    assert p["coverage"]["top_20%"] == pytest.approx(0.75)     # 1 of 4 pairs holds 3 of 4 uses
    assert p["reuse"]["0"]["at_1"] == pytest.approx(0.5)
    assert p["hot"][:2] == [[0, 0, 3], [0, 1, 1]]
    assert coverage_curve(np.array([3, 1, 0, 0]), points=4) == [0.75, 1.0, 1.0, 1.0]
    save_profile(p, tmp_path / "p.json")
    q = load_profile(tmp_path / "p.json")
    assert hot_experts(q, 0.25) == {(0, 0)}


def test_predictor_precision_and_recall_by_hand():
    # 2 layers, top-2; layer 1 guessed: row 0 guesses {1, 2} (real {1, 3}), row 1 {0, 1} (real {0, 1})
    t = trace_of([[[0, 1], [1, 3]], [[0, 1], [0, 1]]],
                 predicted=[[[-1, -1], [1, 2]], [[-1, -1], [0, 1]]],
                 confidence=[[[0, 0], [0.6, 0.2]], [[0, 0], [0.7, 0.1]]])
    q = predictor_quality([t])
    assert q["0"]["all"] == {"precision": 0.75, "recall": 0.75, "guesses_per_token": 2.0}
    assert q["0.5"]["all"] == {"precision": 1.0, "recall": 0.5, "guesses_per_token": 1.0}
    assert list(q["0"]["per_layer"]) == ["1"]
    # one more guess each (3 per token): recall up, precision down; cut back, the top-2 again
    wide = trace_of([[[0, 1], [1, 3]], [[0, 1], [0, 1]]], predicted=[[[-1, -1, -1], [1, 2, 3]], [[-1, -1, -1], [0, 1, 2]]])
    assert predictor_quality([wide])["0"]["all"] == {"precision": 4 / 6, "recall": 1.0, "guesses_per_token": 3.0}
    assert predictor_quality([wide.narrowed(2)])["0"]["all"]["recall"] == 0.75


def test_bad_profiles_are_refused(tmp_path):
    (tmp_path / "a.json").write_text("{")
    with pytest.raises(FormatError, match="a.json: not a JSON"):
        load_profile(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(FormatError, match="b.json: not a moestream routing profile"):
        load_profile(tmp_path / "b.json")
    p = build_profile([trace_of([[[0]]])])
    p["hot"][0] = [0, 9, 1]
    save_profile(p, tmp_path / "c.json")
    with pytest.raises(FormatError, match="c.json: 'hot' names"):
        load_profile(tmp_path / "c.json")
