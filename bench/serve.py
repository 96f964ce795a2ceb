"""`moestream serve` under 1, 4 and 8 concurrent streams on loopback: aggregate decode tokens/s
and expert bytes read per generated token, at a device budget of 25 % of the experts. Each
level gets a fresh server (cold cache); the model is the trained routing model
(moestream.bench.routing_model: real routing), prompts are held-out standard-library text.
Bounded: --tokens per stream, --levels.

    .venv/bin/python bench/serve.py [--tokens 64] [--levels 1,4,8] [--budget 25%]"""
from __future__ import annotations

import argparse
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import uvicorn

import moestream
from moestream.bench import routing_model
from moestream.bench.traces import held_out_texts
from moestream.compute.generation import load_tokenizer
from moestream.serving.app import create_app


def serve_level(store, budget: int, streams: int, tokens: int, prompts: list[str]) -> dict:
    model = moestream.load_model(store, device_budget=budget, host_budget=0)
    app = create_app(model, load_tokenizer(model), model_name="m", max_batch=8, max_tokens_cap=tokens)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)
    try:
        before = model.store.stats()
        t0 = time.perf_counter()

        def one(p):
            r = client.completions.create(model="m", prompt=p, max_tokens=tokens, temperature=0)
            return r.usage.completion_tokens
        with ThreadPoolExecutor(streams) as ex:
            produced = sum(ex.map(one, prompts[:streams]))
        wall = time.perf_counter() - t0
        after = model.store.stats()
        sched = app.state.scheduler
        return {"streams": streams, "tokens": produced, "wall_s": wall, "tokens_per_s": produced / wall,
                "decode_steps": sched.steps, "bytes_read": after["bytes_read"] - before["bytes_read"],
                "bytes_read_per_token": (after["bytes_read"] - before["bytes_read"]) / produced,
                "expert_requests_per_token": (after["requests"] - before["requests"]) / produced}
    finally:
        srv.should_exit = True
        t.join(timeout=10)
        model.store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--levels", default="1,4,8")
    p.add_argument("--budget", default="25%")
    a = p.parse_args()
    store, total = routing_model.ensure_store()
    budget = int(total * float(a.budget.rstrip("%")) / 100)
    prompts = [t[:400] for t in held_out_texts(8)]
    print(f"trained routing model (4 layers x 32 experts, top-2, fp32), device budget {a.budget} of "
          f"{total / 2**20:.1f} MiB experts, {a.tokens} greedy tokens per stream, loopback, CPU, warm page cache")
    print("| streams | tokens | tok/s (aggregate) | decode steps | MiB read | KiB read per token | expert requests per token |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in a.levels.split(",")):
        r = serve_level(store, budget, n, a.tokens, prompts)
        print(f"| {n} | {r['tokens']} | {r['tokens_per_s']:.1f} | {r['decode_steps']} | {r['bytes_read'] / 2**20:.1f} | "
              f"{r['bytes_read_per_token'] / 1024:.1f} | {r['expert_requests_per_token']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
