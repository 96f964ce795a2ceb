"""Record the trained routing model's held-out traces, the inputs of `moestream bench cache`,
`moestream profile` and docs/CACHING.md: the model reading `--tokens` tokens of each of `--texts`
held-out standard-library files (teacher-forced decode, one token per step), one trace per file,
with the next-layer guesses of its routers, a second set with those of next-layer probes
fitted on training text (compute/predictor.py; one hidden layer, the default) and a third with
linear probes fitted on the same tokens. Then the profile of each set (the first set's is what
`--calibrate` and `convert --profile` take).

    .venv/bin/python bench/heldout_traces.py [--out build] [--texts 4] [--tokens 400]

writes OUT/trace-heldout{,-probes,-linear}-{i}.npz and OUT/profile-heldout{,-probes,-linear}.json,
and prints the predictor's precision / recall of each set. Guesses cover every layer, the first
from the token's embedding, and name the top-k experts and --extra-guesses more (default 1, so
`bench cache --extra-guesses 0` or `1` can replay either width)."""
from __future__ import annotations

import argparse
from pathlib import Path

from moestream.bench import routing_model
from moestream.bench.traces import fit_text_probes, held_out_texts, record_text_trace
from moestream.formats.profile import build_profile, predictor_quality, save_profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="build")
    p.add_argument("--texts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=400, help="tokens read of each file")
    p.add_argument("--extra-guesses", type=int, default=1, help="experts guessed beyond the top-k (default 1)")
    a = p.parse_args()
    out = Path(a.out)
    store, _ = routing_model.ensure_store()
    texts = held_out_texts(a.texts)
    sets = (("", None, "next routers"), ("-probes", fit_text_probes(store), "fitted probes"),
            ("-linear", fit_text_probes(store, width=0), "fitted linear probes"))
    for suffix, predictor, what in sets:
        traces, names = [], []
        for i, text in enumerate(texts):
            t = record_text_trace(store, [text], tokens_per_text=a.tokens, predictor=predictor,
                                  extra_guesses=a.extra_guesses)
            name = out / f"trace-heldout{suffix}-{i}.npz"
            t.save(name)
            traces.append(t)
            names.append(str(name))
        prof = build_profile(traces, names)
        save_profile(prof, out / f"profile-heldout{suffix}.json")
        width, k = traces[0].guess_width, traces[0].top_k
        print(f"guesses from {what}, {width} per token and layer (confidence >=: precision / recall; "
              "per layer: recall):")
        for thr, q in (prof["predictor"] or {}).items():
            layers = "  ".join(f"{l}: " + ("-" if v["recall"] is None else f"{v['recall']:.0%}")
                               for l, v in q["per_layer"].items())   # None: no guess reached the threshold
            print(f"  {thr}: {q['all']['precision']:.1%} / {q['all']['recall']:.1%}, "
                  f"{q['all']['guesses_per_token']:.1f} guesses per token; per layer {layers}")
        # the must-show's measure: the top-k of each guess against the router's top-k, one layer
        # ahead (the first layer, guessed from the embedding, apart)
        top = predictor_quality([t.narrowed(k) for t in traces], (0.0,))["0"]
        nxt = [v for l, v in top["per_layer"].items() if l != str(traces[0].layers[0])]
        hit = sum(v["recall"] for v in nxt) / len(nxt)
        first = top["per_layer"].get(str(traces[0].layers[0]))
        print(f"  top-{k} of each guess: next layers {hit:.1%} (precision = recall), first layer from the embedding "
              + ("-" if first is None else f"{first['recall']:.1%}"))


if __name__ == "__main__":
    main()
