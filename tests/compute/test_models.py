"""End to end: transformers checkpoint -> convert -> stream with a budget below the experts'
size -> logits and greedy tokens against the same model in transformers."""
import platform
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import moestream
from moestream.compute import load_model
from moestream.formats import StoreReader

from ..conftest import FAMILIES, store_logits

TOLERANCE = 1e-4   # max |logit difference| in fp32


def expert_bytes(store):
    with StoreReader(store) as r:
        return max(sum(t.numel * 4 for t in reg.tensors) for reg in r.index.extents.values()), \
            sum(sum(t.numel * 4 for t in reg.tensors) for reg in r.index.extents.values())


@pytest.fixture(scope="module")
def lossless(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("lossless")
    return {f: moestream.convert(checkpoints[f], root / f, progress=False) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_match_transformers(checkpoints, lossless, family):
    ref = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()
    one, total = expert_bytes(lossless[family])
    budget = 3 * one
    assert budget < total
    model = load_model(lossless[family], device_budget=budget, host_budget=0)
    try:
        torch.manual_seed(1)
        ids = torch.randint(0, ref.config.vocab_size, (2, 16))
        with torch.no_grad():
            want = ref(ids).logits
            got = model(ids)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max().item() < TOLERANCE
        prompt = ids[:1, :6]
        want_tokens = ref.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                   pad_token_id=ref.config.pad_token_id)
        got_tokens = model.generate(prompt, 20)
        assert torch.equal(got_tokens, want_tokens)
        st = model.store.stats()
        n_experts = len(model.store.layers) * model.store.experts_per_layer
        assert st["misses"] + st["prefetch_issued"] > n_experts   # experts were evicted and read again
        assert st["l1_peak"] <= budget and st["evictions_l1"] > 0
    finally:
        model.store.close()


def test_bytes_read_counts_the_extents_read(lossless, monkeypatch):
    """The report's bytes_read equals the padded size of the extents the backend was asked for."""
    from moestream.storage.store import Store
    issued = []
    real = Store._issue

    def spy(self, load, slab):
        issued.append(load.region.padded_length)
        return real(self, load, slab)
    monkeypatch.setattr(Store, "_issue", spy)
    for prefetch in (False, True):
        issued.clear()
        model = load_model(lossless["olmoe"], device_budget="1GiB", host_budget=0, prefetch=prefetch)
        try:
            with torch.no_grad():
                model(torch.randint(0, 256, (1, 8)))
                model(torch.randint(0, 256, (1, 8)))
            st = model.store.stats()
        finally:
            model.store.close()
        if not prefetch:
            assert st["bytes_read"] == sum(issued) and st["reads"] == len(issued)
        else:   # a speculative read withdrawn after it was issued (a wrong guess) reads nothing
            cancelled = st["prefetch_cancelled"]
            assert sum(issued) - cancelled * max(issued) <= st["bytes_read"] <= sum(issued)
            assert len(issued) - cancelled <= st["reads"] <= len(issued)
        if not prefetch:
            assert st["reads"] == st["misses"] and st["prefetch_issued"] == 0
        else:  # speculative reads are reads too, and no expert is read twice with a 1 GiB budget; a
            # guess the router rejects before its read starts (the first layer's, guessed from the
            # embedding just before it routes, often is) is withdrawn, counted cancelled, not read
            assert st["prefetch_issued"] > 0 and st["reads"] > st["misses"]
            withdrawn = st["prefetch_cancelled"] + st["prefetch_skipped"]
            assert st["misses"] + st["prefetch_issued"] - withdrawn <= st["reads"] <= st["misses"] + st["prefetch_issued"]


@pytest.mark.parametrize("quant,min_top1,max_kl", [("int8", 0.9, 0.01), ("int4", 0.6, 0.2)])
def test_int_stores_logit_error(checkpoints, tmp_path, quant, min_top1, max_kl):
    ref = AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"], dtype=torch.float32).eval()
    store = moestream.convert(checkpoints["mixtral"], tmp_path / quant, quant=quant, progress=False)
    torch.manual_seed(2)
    ids = torch.randint(0, ref.config.vocab_size, (4, 32))
    with torch.no_grad():
        want = ref(ids).logits
    got = store_logits(store, ids, device_budget="64MiB")
    top1 = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item() / ids.shape[1]
    print(f"{quant}: top-1 agreement {top1:.4f}, KL(ref||{quant}) {kl:.6f} nats/token")
    assert top1 >= min_top1 and kl <= max_kl


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moestream.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_generate_streams_and_reports(lossless):
    one, total = expert_bytes(lossless["qwen2_moe"])
    p = run_cli("generate", lossless["qwen2_moe"], "--prompt", "The quick brown fox", "--max-new-tokens", "8",
                "--device-budget", 2 * one, "--host-budget", "0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("The quick brown fox")
    assert "tok/s" in p.stderr and "L1 hits" in p.stderr and "read" in p.stderr and "stall" in p.stderr


def test_cli_quiet_keeps_only_the_text_and_errors_and_verbose_shows_tracebacks(lossless):
    store = lossless["mixtral"]
    p = run_cli("generate", store, "--prompt", "The quick brown fox", "--max-new-tokens", "4", "-q")
    assert p.returncode == 0 and p.stdout.startswith("The quick brown fox") and p.stderr == "", p.stderr
    p = run_cli("generate", store, "--prompt", "hi", "--device-budget", "1KiB", "--quiet")
    assert p.returncode == 1 and p.stderr.startswith("moestream: error:") and len(p.stderr.splitlines()) == 1
    p = run_cli("generate", store, "--prompt", "hi", "--device-budget", "1KiB", "-v")
    assert p.returncode == 1 and "Traceback" in p.stderr and "smaller than one expert" in p.stderr
    p = run_cli("generate", store, "--prompt", "hi", "-q", "-v")
    assert p.returncode == 2 and "not allowed with argument" in p.stderr
    p = run_cli("inspect", store, "-q")
    assert p.returncode == 0 and p.stdout and p.stderr == ""


@pytest.mark.parametrize("args,needle,code", [
    (("--device-budget", "1KiB"), "smaller than one expert", 1),
    (("--max-new-tokens", "0"), "at least 1", 2),
    (("--device", "foo"), "device='foo': not a device", 2),
    (("--device-budget", "1e999"), "not a finite byte size", 2),
    (("--host-budget", "1e30"), "larger than 1 EiB", 2),
    (("--max-new-tokens", "100000000"), "does not fit the model's context of 256 positions", 2),
    (("--temperature", "nan"), "non-negative number", 2),
])
def test_cli_generate_errors_are_one_line(lossless, args, needle, code):
    p = run_cli("generate", lossless["mixtral"], "--prompt", "hi", *args)
    assert p.returncode == code and "Traceback" not in p.stderr, p.stderr
    assert needle in p.stderr.strip().splitlines()[-1], p.stderr   # argparse may print its usage above


@pytest.mark.parametrize("bad", [True, 1.7, "1", None])
def test_api_refuses_non_integer_indices_and_budgets(lossless, bad):
    with moestream.open(lossless["mixtral"], io="posix", device_budget="1MiB", host_budget=0) as s:
        for call in (lambda: s.fetch(bad, [0]), lambda: s.fetch(0, [bad]), lambda: s.get(0, bad),
                     lambda: s.prefetch(0, [bad]), lambda: s.note_routing(bad, [0])):
            with pytest.raises(moestream.UsageError, match="expected an integer index"):
                call()
        import numpy as np
        assert torch.equal(s.get(np.int64(0), np.int64(1))["w1"], s.get(0, 1)["w1"])   # numpy ints are indices
    for budget in (float("nan"), float("inf"), "1e999"):
        with pytest.raises(moestream.UsageError, match="finite"):
            moestream.open(lossless["mixtral"], device_budget=budget)
    with pytest.raises(ValueError):  # UsageError is a ValueError too
        moestream.open(lossless["mixtral"], device_budget=-1)


def test_cli_generate_missing_and_corrupt_store(lossless, tmp_path):
    import shutil
    p = run_cli("generate", tmp_path / "nope", "--prompt", "hi")
    assert p.returncode != 0 and "no such store" in p.stderr and "Traceback" not in p.stderr
    dst = tmp_path / "s"
    shutil.copytree(lossless["mixtral"], dst)
    with StoreReader(dst) as r:
        regs = [r.extent(l, e) for l in r.layers for e in range(r.experts_per_layer)]
    with open(dst / "experts-00000.moe", "r+b") as f:
        for reg in regs:
            f.seek(reg.offset + 8)
            f.write(b"\xde\xad\xbe\xef")
    p = run_cli("generate", dst, "--prompt", "hi", "--max-new-tokens", "2")
    assert p.returncode != 0 and "checksum mismatch" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "layer" in p.stderr and "expert" in p.stderr


def test_a_tokenizer_that_is_not_json_is_one_line(lossless, tmp_path):
    """tokenizer.json carried in the store but malformed: one line naming the store."""
    import shutil
    from tests.formats.test_corruption import plant_region
    store = tmp_path / "s"
    shutil.copytree(lossless["mixtral"], store)
    junk = b"this is not a tokenizer" * 4

    def edit(doc, offset, length, digest):
        doc["blobs"]["tokenizer.json"] = {"file": 0, "offset": offset, "length": length, "raw_length": length,
                                          "checksum": digest, "chain": []}
    plant_region(store / "experts-00000.moe", junk, edit)
    p = run_cli("generate", store, "--prompt", "hi", "--max-new-tokens", "2")
    assert p.returncode == 1 and "the carried tokenizer.json cannot be loaded" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_loading_and_decoding_do_not_import_torch_dynamo(lossless):
    # building the model on the meta device must not run init or arange there: either imports
    # torch._dynamo, 1.5 s of every start-up on the development machine
    code = ("import sys, torch\n"
            "from moestream.compute import load_model\n"
            f"m = load_model({str(lossless['mixtral'])!r}, device_budget='64MiB')\n"
            "m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)\n"
            "m.store.close()\n"
            "print('torch._dynamo' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"



def _rss_anon() -> int:
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("RssAnon:"))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_heap_gives_freed_heap_memory_back():
    """What glibc keeps after a load's transient copies are freed (holes in its heap, once its
    mmap threshold has grown) goes back to the OS (compute/loader.py: trim_heap)."""
    from moestream.compute.loader import trim_heap
    first = torch.empty(16 << 20, dtype=torch.uint8)
    del first                                            # a freed mmap: glibc's threshold grows to 16 MiB
    blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(64)]     # from the heap now
    kept = blocks[1::2]
    del blocks                                           # 128 MiB of holes between the kept blocks
    before = _rss_anon()
    assert trim_heap()
    assert before - _rss_anon() > (64 << 20)
    del kept


def test_load_model_trims_the_heap(lossless, monkeypatch):
    from moestream.compute import loader
    calls = []
    monkeypatch.setattr(loader, "trim_heap", lambda: calls.append(1) or True)
    model = load_model(lossless["qwen3_moe"], device_budget="64MiB", host_budget=0)
    model.store.close()
    assert calls == [1]
