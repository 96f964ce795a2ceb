"""One vLLM engine on a moestream store through the plugin, run in its own process by
test_vllm.py (vLLM's in-process engine holds global state; a fresh process per engine keeps
the tests independent). Prints one JSON line: greedy tokens and the Store's counters per phase.

argv[1]: JSON {"store", "dtype", "max_tokens", "prompts": [[token ids], ...],
               "loader": model_loader_extra_config or null, "phases": ["single", "batched"],
               "load_format": "moestream" (default) or "auto" (vLLM's own loader on a checkpoint),
               "numba_first": import moestream.compute (Numba, llvmlite) before vLLM, as a script
                              that converts a store and then serves it does,
               "logprobs": N, to also return each step's N most likely tokens as [[token, logprob], ...]}
"single" generates each prompt on its own, one after another; "batched" all prompts in one
`LLM.generate`. Counters are the differences over each phase."""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COUNTERS = ("requests", "hits_l1", "misses", "reads", "bytes_read", "evictions_l1")


def generated(results) -> dict:
    """Each request's tokens, and where logprobs were asked for, each step's top tokens, most likely first."""
    out = {"tokens": [list(r.outputs[0].token_ids) for r in results]}
    if results and results[0].outputs[0].logprobs is not None:
        out["top"] = [[sorted(([t, lp.logprob] for t, lp in step.items()), key=lambda x: -x[1])
                       for step in r.outputs[0].logprobs] for r in results]
    return out


def main() -> None:
    args = json.loads(sys.argv[1])
    if args.get("numba_first"):
        import moestream.compute  # noqa: F401
    from vllm import LLM, SamplingParams
    from moestream.integrations.vllm import stores
    load_format = args.get("load_format", "moestream")
    llm = LLM(model=args["store"], load_format=load_format, model_loader_extra_config=args.get("loader") or {},
              dtype=args["dtype"], enforce_eager=True, max_model_len=128, enable_prefix_caching=False,
              seed=0)
    params = SamplingParams(max_tokens=args["max_tokens"], temperature=0.0, ignore_eos=True,
                            logprobs=args.get("logprobs"))
    prompts = [{"prompt_token_ids": p} for p in args["prompts"]]
    if load_format != "moestream":
        results = llm.generate(prompts, params, use_tqdm=False)
        print("RESULT " + json.dumps(generated(results)), flush=True)
        return
    store = stores()[args["store"]]
    # what vLLM's model holds: no routed expert parameter may be among them
    held = llm.apply_model(lambda m: [n for n, _ in m.named_parameters()])[0]
    out = {"expert_params": [n for n in held if ".experts." in n and "shared" not in n],
           "l1_budget": store.stats()["l1_budget"],
           "experts_per_layer": store.experts_per_layer, "moe_layers": len(store.index.moe_layers),
           "expert_bytes": sum(store.held_length(reg) for reg in store.index.extents.values())}
    for phase in args.get("phases", ["single"]):
        before = store.stats()
        if phase == "single":
            results = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
        else:
            results = llm.generate(prompts, params, use_tqdm=False)
        after = store.stats()
        out[phase] = {**generated(results), **{k: after[k] - before[k] for k in COUNTERS}}
    out["l1_peak"] = store.stats()["l1_peak"]
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
