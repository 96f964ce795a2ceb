"""`moestream convert|inspect|verify|generate|chat|fit-predictor|profile|serve|bench`. User mistakes end in one line
on stderr and a non-zero exit, never a traceback (set MOESTREAM_DEBUG=1, or pass -v, to see one); -q keeps only
that line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Optional, Sequence

from .errors import MoestreamError, UsageError
from .formats.constants import DEFAULT_GROUP_SIZE, DEFAULT_ZSTD_LEVEL, DEFAULT_ZSTD_MIN_SAVING
from .units import parse_size


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 2, as argparse's own do
        self.print_usage(sys.stderr)
        print(f"moestream: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _budget(value: str) -> str | int:
    """A tier budget: a size, "auto" or "N%" (resolved against free memory by the Store)."""
    v = value.strip().lower()
    if v == "auto" or v.endswith("%"):
        return v
    return _size(value)


BUDGET_HELP = ("a size (2GiB), a share of what is free (50%%) or auto (default: a quarter of free device "
               "memory on CUDA, of available RAM on a CPU)")
HOST_BUDGET_HELP = ("stored experts kept in RAM: a size, a share of what is free (10%%), auto, or 0 (none). Default: "
                    "a quarter of available RAM on CUDA; 0 on a CPU, where the device tier is RAM already")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moestream", description="Stream Mixture-of-Experts weights from NVMe.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"moestream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("convert", help="convert a Hugging Face safetensors checkpoint or a GGUF file into a store")
    c.add_argument("src", help="checkpoint directory (config.json + *.safetensors), or a .gguf file (any file of a "
                               "split GGUF; needs the gguf package: pip install 'moestream[gguf]')")
    c.add_argument("out", help="store directory to create")
    c.add_argument("--quant", default="keep", choices=["keep", "bf16", "fp16", "fp32", "int8", "int4"],
                   help="expert encoding (default: keep the source dtype, lossless; FP8, MXFP4 and quantized "
                        "GGUF weights are dequantized and kept as bf16)")
    c.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"elements per quantization group (default {DEFAULT_GROUP_SIZE})")
    z = c.add_mutually_exclusive_group()
    z.add_argument("--zstd-level", type=int, default=DEFAULT_ZSTD_LEVEL,
                   help=f"zstd level, kept only where it pays (default {DEFAULT_ZSTD_LEVEL})")
    z.add_argument("--no-zstd", action="store_true", help="never compress")
    c.add_argument("--zstd-min-saving", type=float, default=DEFAULT_ZSTD_MIN_SAVING, metavar="S",
                   help="an expert extent keeps zstd only when it saves this share of its bytes (default "
                        f"{DEFAULT_ZSTD_MIN_SAVING}: on NVMe decoding costs more than the read it saves; 0 for slow disks)")
    d = c.add_mutually_exclusive_group()
    d.add_argument("--delta", dest="delta", action="store_true", default=True,
                   help="try a delta against the layer's mean expert, kept only where it pays (default)")
    d.add_argument("--no-delta", dest="delta", action="store_false", help="never code an expert as a delta")
    c.add_argument("--profile", metavar="PROFILE.json",
                   help="mixed precision from a routing profile (moestream profile): hot experts get --hot-bits")
    c.add_argument("--hot-bits", type=int, default=8, choices=[8, 4], help="bits of the hot experts (default 8)")
    c.add_argument("--cold-bits", type=int, default=4, choices=[8, 4], help="bits of the other experts (default 4)")
    c.add_argument("--hot-fraction", type=float, default=0.2,
                   help="share of (layer, expert) pairs that are hot, most used first (default 0.2)")
    c.add_argument("--max-file-size", type=_size, default=None, help="cap per store file, e.g. 4GiB")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new store is complete)")

    i = sub.add_parser("inspect", help="describe a store")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="one JSON object")

    v = sub.add_parser("verify", help="check every checksum of a store")
    v.add_argument("store")

    g = sub.add_parser("generate", help="generate text with a model streamed from a store")
    g.add_argument("store")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text; - reads it from standard input")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (UTF-8)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    g.add_argument("--device-budget", type=_budget, default=None, help="experts held on the device: " + BUDGET_HELP)
    g.add_argument("--host-budget", type=_budget, default=None, help=HOST_BUDGET_HELP)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, with --temperature above 0 (default 0)")
    g.add_argument("--io", default="auto", choices=["auto", "uring", "posix", "kvikio"],
                   help="read backend (default auto: kvikio on CUDA where it works, else io_uring, else posix)")
    g.add_argument("--prefetch", action="store_true",
                   help="prefetch the next layer's likely experts (speculative; see docs/BENCHMARKS.md)")
    g.add_argument("--prefetch-threshold", type=float, default=0.0,
                   help="prefetch only guesses whose router probability reaches this (0-1; default 0: all)")
    g.add_argument("--extra-guesses", type=int, default=0, metavar="N",
                   help="guess N experts per token and layer beyond the top-k, for --prefetch and --trace "
                        "(default 0; more hits, more reads: docs/CACHING.md)")
    g.add_argument("--predictor", metavar="PROBES.npz",
                   help="guess the next layer's experts with these probes (moestream fit-predictor), not its router")
    g.add_argument("--engine", default="auto", choices=["auto", "native", "transformers"],
                   help="native: moestream's own forward; transformers: transformers' model class with the "
                        "moestream experts implementation; auto (default): native where the family has one")
    g.add_argument("--trace", metavar="FILE", help="record the routing of every token into FILE (.npz; see moestream profile)")
    g.add_argument("--overwrite", action="store_true", help="replace the --trace file if it exists")
    g.add_argument("--expert-compute", default="quantized", choices=["quantized", "dequantized"],
                   help="int8/int4 stores: quantized (default) holds experts as stored and multiplies them in place; "
                        "dequantized decodes them to bf16 on load (more bytes per cached expert)")
    g.add_argument("--dense-quant", default="auto", choices=["auto", "int8", "int4", "none"],
                   help="the dense linear layers (attention, shared experts, lm_head; not the routers), quantized "
                        "once at load: auto (default) = int8 for an int8/int4 store on a CPU, none otherwise; "
                        "none keeps them in the compute dtype (native engine only)")

    ch = sub.add_parser("chat", help="talk to a store's model on the terminal (its chat template, streamed replies)")
    ch.add_argument("store")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    ch.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ch.add_argument("--system", help="a system message to start the conversation with")
    ch.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ch.add_argument("--device-budget", type=_budget, default=None, help="experts held on the device: " + BUDGET_HELP)
    ch.add_argument("--host-budget", type=_budget, default=None, help=HOST_BUDGET_HELP)

    sv = sub.add_parser("serve", help="an OpenAI-compatible server (needs the serve extra: fastapi, uvicorn)")
    sv.add_argument("store")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    sv.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    sv.add_argument("--device-budget", type=_budget, default=None, help="experts held on the device: " + BUDGET_HELP)
    sv.add_argument("--host-budget", type=_budget, default=None, help=HOST_BUDGET_HELP)
    sv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    sv.add_argument("--max-tokens", type=int, default=1024, help="cap on a request's max_tokens (default 1024)")
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/* and /metrics")
    sv.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                    help="a Host header name to answer (repeatable; '*' for any). Default: the --host address and "
                         "the loopback names, so that a web page cannot reach the server by DNS rebinding")
    sv.add_argument("--max-body", type=_size, default=8 << 20, help="largest request body (default 8MiB; more gets 413)")
    sv.add_argument("--max-connections", type=int, default=256,
                    help="open connections at most (default 256; more get 503)")

    fp = sub.add_parser("fit-predictor", help="fit next-layer probes (guesses for --prefetch; the first layer's from the "
                        "embedding) on text")
    fp.add_argument("store")
    fp.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files to fit on")
    fp.add_argument("--held-out", nargs="+", default=[], metavar="FILE", help="text files to score on (not fitted)")
    fp.add_argument("--tokens", type=int, default=20000, help="tokens to fit on (default 20000)")
    fp.add_argument("--hidden", type=int, default=None,
                    help="hidden units of each probe (default: DEFAULT_PROBE_WIDTH in compute/predictor.py; it "
                         "needs ~80000 tokens to beat a linear probe); 0: linear, by ridge regression")
    fp.add_argument("--ridge", type=float, default=1.0, help="L2 penalty of the linear probes' regression (default 1.0)")
    fp.add_argument("-o", "--output", required=True, metavar="PROBES.npz", help="the probes file to write")
    fp.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    pr = sub.add_parser("profile", help="per-expert counts, coverage and reuse distances of routing traces")
    pr.add_argument("traces", nargs="+", help="trace files (moestream generate --trace)")
    pr.add_argument("-o", "--output", required=True, metavar="PROFILE.json", help="the profile to write")
    pr.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    pr.add_argument("--plot", metavar="FILE.png", help="a per-layer heat map of the experts' shares of activations")

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    bio = bsub.add_parser("io", help="expert-read throughput per backend against fio and safetensors")
    src = bio.add_mutually_exclusive_group(required=True)
    src.add_argument("store", nargs="?", help="a store to read")
    src.add_argument("--synthetic", type=_size, metavar="SIZE", help="build a synthetic bf16 store of SIZE (e.g. 2GiB)")
    bio.add_argument("--source", help="the store's source checkpoint, for the safetensors comparison")
    bio.add_argument("--workdir", help="where --synthetic writes (default: the system temp dir)")
    bio.add_argument("--chunk", type=_size, default=1 << 20, help="bytes per read request (default 1MiB)")
    bio.add_argument("--queue-depth", type=int, default=32, help="requests in flight per backend (default 32)")
    bio.add_argument("--repeat", type=int, default=3, help="passes per figure; the median is reported")
    bio.add_argument("--backend", action="append", choices=["uring", "posix", "kvikio"], help="limit to these")
    bio.add_argument("--json", action="store_true", help="print one JSON object")
    bio.add_argument("--plot", metavar="FILE.png", help="GB/s against queue depth per request size, ours and fio's")
    from .bench.cache import add_arguments as cache_arguments
    cache_arguments(bsub.add_parser("cache", help="hit rate of each eviction policy on routing traces, against Belady"))
    from .bench.convert import add_arguments as convert_arguments
    convert_arguments(bsub.add_parser("convert", help="conversion input GB/s for --quant keep and int4 against the "
                                      "disk's sequential read and write (fio) and the cores' encode rate"))
    from .bench.decode import add_arguments as decode_arguments
    decode_arguments(bsub.add_parser("decode", help="decode tokens/s against naive loading, accelerate and the I/O "
                                     "ceiling, each under one memory limit"))
    for parser in (*sub.choices.values(), *bsub.choices.values()):
        if parser is not b:
            _verbosity_arguments(parser, quiet=parser is not ch)   # chat's prompt and replies are its output
    return p


def _verbosity_arguments(parser: argparse.ArgumentParser, quiet: bool = True) -> None:
    v = parser.add_mutually_exclusive_group()
    if quiet:
        v.add_argument("-q", "--quiet", action="store_true",
                       help="errors only: no progress bars, reports, notes or warnings on stderr")
    v.add_argument("-v", "--verbose", action="store_true",
                   help="every warning, and errors with their traceback (as MOESTREAM_DEBUG=1)")


def _convert(a: argparse.Namespace) -> int:
    from . import convert
    hot = None
    if a.profile is not None:
        from .formats.profile import hot_experts, load_profile
        if not 0.0 <= a.hot_fraction <= 1.0:
            raise UsageError(f"--hot-fraction {a.hot_fraction}: must lie in 0..1")
        hot = hot_experts(load_profile(a.profile), a.hot_fraction)
    path = convert(a.src, a.out, quant=a.quant, group_size=a.group_size,
                   zstd_level=None if a.no_zstd else a.zstd_level, zstd_min_saving=a.zstd_min_saving, delta=a.delta,
                   max_file_size=a.max_file_size,
                   overwrite=a.overwrite, progress=not a.quiet, hot_experts=hot, hot_quant=f"int{a.hot_bits}",
                   cold_quant=f"int{a.cold_bits}")
    print(f"wrote {path}")
    return 0


def _inspect(a: argparse.Namespace) -> int:
    from .formats.inspect import describe, format_description
    from .formats.reader import StoreReader
    with StoreReader(a.store) as r:
        d = describe(r)
    print(json.dumps(d, indent=2) if a.json else format_description(d))
    return 0


def _verify(a: argparse.Namespace) -> int:
    from .engines import dense_problems
    from .formats.reader import StoreReader
    with StoreReader(a.store) as r:
        bad = r.verify_all(dense_check=dense_problems)
        n = len(list(r.regions()))
    for line in bad:
        print(line)
    if bad:
        print(f"{len(bad)} of {n} regions are corrupt", file=sys.stderr)
        return 1
    print(f"ok: {n} regions, all checksums match")
    return 0


def _bench(a: argparse.Namespace) -> int:
    if a.bench == "cache":
        from .bench.cache import run as run_cache
        return run_cache(a)
    if a.bench == "convert":
        from .bench.convert import run as run_convert
        return run_convert(a)
    if a.bench == "decode":
        from .bench.decode import run
        return run(a)
    if a.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    from .bench.io import bench_io, format_table, plot
    if a.plot:
        check_output(a.plot, "--plot", [a.store] if a.store else [], True)   # a plot is replaced, as bench decode's is
    log = (lambda msg: print(msg, file=sys.stderr)) if a.json else print
    d = bench_io(a.store, synthetic=a.synthetic, source=a.source, workdir=a.workdir, chunk=a.chunk,
                 queue_depth=a.queue_depth, repeat=a.repeat, backends=a.backend, progress=log)
    print(json.dumps(d, indent=2) if a.json else "\n" + format_table(d))
    if a.plot:
        plot(d, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


def check_output(path: str, option: str, inputs: list[str], overwrite: bool) -> None:
    """The rule for every file the CLI writes: its directory exists; never a file inside a store
    (nor a store itself), never one of the command's own inputs; an existing file only with
    --overwrite. The writers then write a temporary file and rename it into place. UsageError
    naming the option and what the path is otherwise."""
    from pathlib import Path
    from .formats.writer import is_store
    out = Path(path).resolve()
    if not out.parent.is_dir():
        raise UsageError(f"{option} {path}: its directory does not exist")
    for d in (out, *out.parents):
        if is_store(d):
            raise UsageError(f"{option} {path}: lies inside the store {d}; write it somewhere else")
    for given in inputs:
        src = Path(given).resolve()
        if out == src or src in out.parents:
            raise UsageError(f"{option} {path}: is one of this command's inputs ({given}); write it somewhere else")
    if out.is_dir():
        raise UsageError(f"{option} {path}: is a directory")
    if out.exists() and not overwrite:
        raise UsageError(f"{option} {path}: exists; pass --overwrite to replace it")


def _read_prompt(a: argparse.Namespace) -> str:
    """--prompt TEXT, --prompt - (standard input) or --prompt-file FILE."""
    if a.prompt_file is not None:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file {a.prompt_file}: not UTF-8 text (byte {e.start})") from None
    elif a.prompt == "-":
        text = sys.stdin.read()
    else:
        return a.prompt
    text = text.rstrip("\n")
    if not text:
        raise UsageError("the prompt is empty")
    return text


def _generate(a: argparse.Namespace) -> int:
    from .compute.generation import generate_text
    a.prompt = _read_prompt(a)
    if a.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if not a.temperature >= 0:  # NaN too
        raise UsageError("--temperature must be a non-negative number")
    if not 0.0 <= a.prefetch_threshold <= 1.0:
        raise UsageError("--prefetch-threshold must lie in 0..1")
    if a.trace is not None:
        check_output(a.trace, "--trace", [a.store] + ([a.predictor] if a.predictor else []), a.overwrite)
    if a.predictor and not a.prefetch and a.trace is None:
        # the probes only make guesses, for --prefetch (and for the guesses a --trace records):
        # given alone they would do nothing, so they bring prefetch with them, and say so
        a.prefetch = True
        print("moestream: --predictor implies --prefetch (its guesses are what prefetch reads)", file=sys.stderr)
    generate_text(a.store, a.prompt, max_new_tokens=a.max_new_tokens, device=a.device, device_budget=a.device_budget,
                  host_budget=a.host_budget, temperature=a.temperature, seed=a.seed, io=a.io, prefetch=a.prefetch,
                  prefetch_threshold=a.prefetch_threshold, trace=a.trace, engine=a.engine, predictor=a.predictor,
                  extra_guesses=a.extra_guesses, expert_compute=a.expert_compute,
                  dense_quant=None if a.dense_quant == "none" else a.dense_quant, err=sys.stderr)
    return 0


def _fit_predictor(a: argparse.Namespace) -> int:
    from pathlib import Path
    from tqdm import tqdm
    from .compute.generation import load_tokenizer
    from .compute.loader import load_model
    from .compute.predictor import DEFAULT_PROBE_WIDTH, collect, probes_from, score, token_batches
    if a.tokens < 2:
        raise UsageError("--tokens must be at least 2")
    if not a.ridge >= 0:
        raise UsageError("--ridge must be a non-negative number")
    if a.hidden is None:
        a.hidden = DEFAULT_PROBE_WIDTH
    if a.hidden < 0:
        raise UsageError("--hidden must be 0 (linear probes) or a positive number of units")
    check_output(a.output, "--output", [a.store, *a.text, *a.held_out], a.overwrite)

    def read(files):
        out = []
        for f in files:
            try:
                out.append(Path(f).read_text(encoding="utf-8", errors="replace"))
            except OSError as e:
                raise UsageError(f"{f}: {e.strerror}") from None
        return out
    texts, held = read(a.text), read(a.held_out)
    model = load_model(a.store)
    try:
        tok = load_tokenizer(model)
        batches = token_batches(tok, texts, tokens=a.tokens)
        if not batches:
            raise UsageError(f"--text {' '.join(a.text)}: no tokens to fit on")
        # three stages, each with its bar: the model over the text, one probe per layer (most of
        # the time with hidden units), the model over the held-out text
        with tqdm(total=sum(b.numel() for b in batches), unit="tok", desc="fit-predictor: run the model") as bar:
            fitted_on = collect(model, batches, progress=bar.update)
        with tqdm(total=len(fitted_on[0]), unit="layer", desc="fit-predictor: fit the probes") as bar:
            probes = probes_from(model, *fitted_on, a.ridge, width=a.hidden, progress=bar.update)
        probes.save(a.output)
        print(f"wrote {a.output}: probes for layers {sorted(probes.weights)}, fitted on {probes.meta['tokens']} tokens")
        held_batches = token_batches(tok, held, tokens=a.tokens)
        held_out = None
        if held_batches:
            with tqdm(total=sum(b.numel() for b in held_batches), unit="tok", desc="fit-predictor: held-out text") as bar:
                held_out = collect(model, held_batches, progress=bar.update)
        for name, data in (("fitting text", fitted_on), ("held-out text", held_out)):
            if data:
                rows = score(model, probes, *data)
                print(f"top-{model.cfg.top_k} hit on the {name} (router guess -> probe): " +
                      ", ".join(f"layer {k}: {r['router']:.0%} -> {r['probe']:.0%}" for k, r in rows.items()))
    finally:
        model.store.close()
    return 0


def _profile(a: argparse.Namespace) -> int:
    from .formats.profile import build_profile, save_profile
    from .formats.trace import RoutingTrace
    check_output(a.output, "--output", a.traces, a.overwrite)
    if a.plot:
        check_output(a.plot, "--plot", [*a.traces, a.output], True)
    traces = [RoutingTrace.load(t) for t in a.traces]
    d = build_profile(traces, a.traces)
    save_profile(d, a.output)
    if a.plot:
        from .bench.trace_plot import plot_heat_map
        plot_heat_map(traces, a.plot, title=", ".join(os.path.basename(t) for t in a.traces[:3]))
        print(f"wrote {a.plot}")
    cov = ", ".join(f"{k[4:]} {v:.0%}" for k, v in d["coverage"].items())
    at1 = sum(r["at_1"] for r in d["reuse"].values()) / len(d["reuse"])
    print(f"{d['tokens']} token rows, {len(d['layers'])} layers x {d['num_experts']} experts, top-{d['top_k']}\n"
          f"coverage (share of activations taken by the most used experts): {cov}\n"
          f"reuse at the next step: {at1:.0%} of reuses; cross-layer predictability: "
          + (", ".join(f"{x:.0%}" for x in d["cross_layer"]) or "n/a"))
    if d["predictor"]:
        print("next-layer predictor (router of layer l+1 on layer l's residual) against the router's choice:")
        for thr, q in d["predictor"].items():
            al = q["all"]
            if al["precision"] is not None:
                print(f"  confidence >= {thr}: precision {al['precision']:.0%}, recall {al['recall']:.0%}, "
                      f"{al['guesses_per_token']:.1f} guesses per token; per layer "
                      + ", ".join(f"{l}: {v['precision'] or 0:.0%}/{v['recall'] or 0:.0%}" for l, v in q["per_layer"].items()))
    print(f"wrote {a.output}")
    return 0


def _serve(a: argparse.Namespace) -> int:
    if a.max_batch < 1 or a.max_queue < 1 or a.max_tokens < 1:
        raise UsageError("--max-batch, --max-queue and --max-tokens must be at least 1")
    if not 0 < a.port < 65536:
        raise UsageError(f"--port {a.port}: must lie in 1..65535")
    if a.api_key is not None and not a.api_key.strip():
        raise UsageError("--api-key is empty: every request would be refused (give a key, or leave it out)")
    if a.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    from .extras import require
    require("fastapi", "moestream serve")
    require("uvicorn", "moestream serve")
    import socket
    import uvicorn
    from .serving.app import LOOPBACK_HOSTS, create_app
    from .serving.chat_format import chat_template_of
    from .serving.protocol import GuardedProtocol
    try:   # the address must bind before the model loads (minutes) and before "serving on" is said
        family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((a.host, a.port))
    except (OSError, OverflowError) as e:
        raise UsageError(f"--host {a.host} --port {a.port}: cannot bind ({getattr(e, 'strerror', None) or e})") from None
    from pathlib import Path
    from .compute.generation import load_tokenizer
    from .compute.loader import load_model
    hosts = tuple(a.allowed_host) if a.allowed_host else (a.host, *LOOPBACK_HOSTS)
    model = load_model(a.store, device=a.device, device_budget=a.device_budget, host_budget=a.host_budget)
    try:
        app = create_app(model, load_tokenizer(model), model_name=Path(a.store).name, max_batch=a.max_batch,
                         max_queue=a.max_queue, max_tokens_cap=a.max_tokens, api_key=a.api_key,
                         chat_template=chat_template_of(a.store), max_body_bytes=a.max_body, allowed_hosts=hosts)
        print(f"moestream serve: {a.store} on http://{a.host}:{a.port}/v1 (max batch {a.max_batch}"
              + ("" if a.api_key else "; no --api-key: anyone who can reach the address can use it, /metrics included")
              + ")", file=sys.stderr)
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning", http=GuardedProtocol,
                    limit_concurrency=a.max_connections, timeout_keep_alive=5)
    finally:
        model.store.close()
    return 0


def _chat(a: argparse.Namespace) -> int:
    from .chat import chat
    if a.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if not a.temperature >= 0:
        raise UsageError("--temperature must be a non-negative number")
    chat(a.store, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed, system=a.system,
         device=a.device, device_budget=a.device_budget, host_budget=a.host_budget)
    return 0


COMMANDS = {"chat": _chat, "convert": _convert, "fit-predictor": _fit_predictor, "profile": _profile, "serve": _serve, "inspect": _inspect, "verify": _verify, "bench": _bench, "generate": _generate}


def debug_tracebacks() -> bool:
    """MOESTREAM_DEBUG set to anything but empty, 0, false, no or off: show tracebacks."""
    return os.environ.get("MOESTREAM_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    errors = sys.stderr      # where the one-line error goes, whatever -q silences
    if getattr(args, "verbose", False):
        os.environ["MOESTREAM_DEBUG"] = "1"
        warnings.simplefilter("always")
    quiet = getattr(args, "quiet", False)
    if quiet:
        warnings.simplefilter("ignore")
        sys.stderr = open(os.devnull, "w")
    try:
        return _run(args, errors)
    finally:
        if quiet:
            sys.stderr.close()
            sys.stderr = errors


def _run(args: argparse.Namespace, errors) -> int:
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        hint = " (a conversion resumes when run again with the same arguments)" if args.command == "convert" else ""
        print(f"moestream: interrupted{hint}", file=errors)
        return 130
    except BrokenPipeError:
        # stdout closed by the reader (`| head`): a normal end, not an error. Python would report
        # the pipe again when it flushes stdout at exit, so stdout goes to /dev/null first
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (MoestreamError, OSError, ValueError) as e:
        if debug_tracebacks():
            raise
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"moestream: error: {msg}", file=errors)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
