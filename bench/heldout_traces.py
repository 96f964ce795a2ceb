"""Record the trained routing model's held-out traces, the inputs of `moestream bench cache`,
`moestream profile` and docs/CACHING.md: the model reading `--tokens` tokens of each of `--texts`
held-out standard-library files (teacher-forced decode, one token per step), one trace per file,
with the next-layer guesses of its routers, a second set with those of next-layer probes
fitted on training text (compute/predictor.py; one hidden layer, the default) and a third with
linear probes fitted on the same tokens. Then the profile of each set (the first set's is what
`--calibrate` and `convert --profile` take).

    .venv/bin/python bench/heldout_traces.py [--out build] [--texts 4] [--tokens 400]

writes OUT/trace-heldout{,-probes,-linear}-{i}.npz and OUT/profile-heldout{,-probes,-linear}.json,
and prints the predictor's precision / recall of each set."""
from __future__ import annotations

import argparse
from pathlib import Path

from moestream.bench import routing_model
from moestream.bench.traces import fit_text_probes, held_out_texts, record_text_trace
from moestream.formats.profile import build_profile, save_profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="build")
    p.add_argument("--texts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=400, help="tokens read of each file")
    a = p.parse_args()
    out = Path(a.out)
    store, _ = routing_model.ensure_store()
    texts = held_out_texts(a.texts)
    sets = (("", None, "next routers"), ("-probes", fit_text_probes(store), "fitted probes"),
            ("-linear", fit_text_probes(store, width=0), "fitted linear probes"))
    for suffix, predictor, what in sets:
        traces, names = [], []
        for i, text in enumerate(texts):
            t = record_text_trace(store, [text], tokens_per_text=a.tokens, predictor=predictor)
            name = out / f"trace-heldout{suffix}-{i}.npz"
            t.save(name)
            traces.append(t)
            names.append(str(name))
        prof = build_profile(traces, names)
        save_profile(prof, out / f"profile-heldout{suffix}.json")
        print(f"guesses from {what} (confidence >=: precision / recall):")
        for thr, q in (prof["predictor"] or {}).items():
            layers = "  ".join(f"{l}: " + ("-" if v["precision"] is None else f"{v['precision']:.0%}")
                               for l, v in q["per_layer"].items())   # None: no guess reached the threshold
            print(f"  {thr}: {q['all']['precision']:.1%} / {q['all']['recall']:.1%}, "
                  f"{q['all']['guesses_per_token']:.1f} guesses per token; per layer {layers}")


if __name__ == "__main__":
    main()
