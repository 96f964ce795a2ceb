"""TierCache's eviction policies: the per-layer ranking picks the same victim as the plain
O(n) definition, and each policy does what its docstring says."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moestream.storage.cache import TierCache


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(["next-use", "least-stale", "lru", "lfu"]), layers=st.integers(1, 5),
       experts=st.integers(2, 10), data=st.data())
def test_the_fast_victim_is_the_reference_victim(policy, layers, experts, data):
    slots = data.draw(st.integers(1, layers * experts))
    pinned = data.draw(st.sets(st.tuples(st.integers(0, layers - 1), st.integers(0, experts - 1)), max_size=3))
    c = TierCache("d", slots, policy, sweep=list(range(layers)), pinned=pinned)
    for _ in range(data.draw(st.integers(1, 12))):
        for layer in range(layers):
            if data.draw(st.booleans()):
                c.expect([(layer, e) for e in data.draw(st.sets(st.integers(0, experts - 1), max_size=2))])
            keys = [(layer, e) for e in data.draw(st.sets(st.integers(0, experts - 1), min_size=1, max_size=3))]
            c.visit(layer, keys)
            held = set(keys) if data.draw(st.booleans()) else set()
            for k in keys:
                if c.get(k) is None:
                    if len(c) >= slots:
                        v = c.victim(exclude=held.__contains__)
                        assert v == c.victim_reference(exclude=held.__contains__)
                        if v is None:
                            continue
                        assert v not in pinned and v not in held
                        c.pop(v)
                    c.put(k, True, 1)
            assert c.used <= slots


def test_least_stale_evicts_the_layer_just_passed_first():
    c = TierCache("d", 3, "least-stale", sweep=[0, 1, 2])
    c.visit(0, [(0, 0)])
    c.put((0, 0), 1, 1)
    c.visit(1, [(1, 0)])
    c.put((1, 0), 1, 1)
    c.visit(2, [(2, 0)])
    c.put((2, 0), 1, 1)
    # at layer 2: layer 0 comes next (1 layer away), layer 1 in 2, layer 2 (served) in a full sweep
    assert c.victim() == (2, 0)
    assert c.victim(exclude=lambda k: k == (2, 0)) == (1, 0)


def test_next_use_keeps_a_frequent_expert_and_an_expected_one():
    c = TierCache("d", 2, "next-use", sweep=[0, 1])
    for _ in range(20):                 # expert 0 of layer 0 asked for at every visit
        c.visit(0, [(0, 0)])
        c.put((0, 0), 1, 1)
        c.visit(1, [(1, 1)])
        c.put((1, 1), 1, 1)
    c.visit(1, [(1, 2)])                # layer 1 now asks for 2: a slot must go
    assert c.victim(exclude=lambda k: k == (1, 2)) == (1, 1)    # served, needed no sooner than (0, 0)
    c.expect([(1, 1)])                  # ... unless the predictor says layer 1 will want it again
    c.visit(0, [(0, 3)])
    assert c.victim(exclude=lambda k: k == (0, 3)) == (0, 0)


def test_sweep_policies_need_the_layer_order():
    with pytest.raises(ValueError, match="layer order"):
        TierCache("d", 1, "least-stale")
    with pytest.raises(ValueError, match="policy="):
        TierCache("d", 1, "mru", sweep=[0])


@pytest.mark.parametrize("guessed", [False, True])
def test_next_use_evicts_first_what_the_guesses_will_load_again(guessed):
    # three layers, each asking for its expert 0 at every visit; the predictor (when on) names
    # layer 1's expert every time, never layer 2's (as the first layer of a sweep is never guessed)
    c = TierCache("d", 3, "next-use", sweep=[0, 1, 2])
    for _ in range(30):
        c.visit(0, [(0, 0)])
        c.put((0, 0), 1, 1)
        if guessed:
            c.expect([(1, 0)])
        c.visit(1, [(1, 0)])
        c.put((1, 0), 1, 1)
        c.visit(2, [(2, 0)])
        c.put((2, 0), 1, 1)
    c.visit(0, [(0, 0), (0, 5)])         # a new expert of layer 0 needs a slot, before this round's guess
    v = c.victim(exclude=lambda k: k[0] == 0)
    assert v == c.victim_reference(exclude=lambda k: k[0] == 0)
    # by distance alone layer 2 is further (2 layers against 1) and goes; a layer whose experts
    # the prefetcher loads again anyway is the cheaper one to evict
    assert v == ((1, 0) if guessed else (2, 0))
