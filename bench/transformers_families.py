"""Which of transformers' MoE families (every model whose modeling file uses
`use_experts_implementation`) moestream converts and runs: for each family with neither a record
of ours nor a place in tests/integrations/test_derived_families.py, build a small random model the
way that test does, convert it, run it through `moestream.from_pretrained` and compare logits
(fp32) with transformers. Prints one JSON line per family: the stage that stopped it (build,
convert, run, mismatch, timeout) and the error, or "ok" and the max logit difference.

    .venv/bin/python bench/transformers_families.py [--timeout 300] [FAMILY ...]

Run from the repository root (it takes the test's small configs). Each family runs in a child
process: a family's model can hang or exhaust memory without stopping the survey."""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

CHILD = """
import json, shutil, sys, tempfile
from pathlib import Path
import torch
import moestream
from tests.integrations.test_derived_families import build
fam, tmp = sys.argv[1], Path(tempfile.mkdtemp())
def done(stage, **kw):
    print(json.dumps({"family": fam, "stage": stage, **kw}))
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit()
try:
    ref = build(fam, tmp / "ckpt")
except Exception as e:
    done("build", error=f"{type(e).__name__}: {str(e)[:300]}")
try:
    store = moestream.convert(tmp / "ckpt", tmp / "store", progress=False)
except Exception as e:
    done("convert", error=f"{type(e).__name__}: {str(e)[:400]}")
try:
    model = moestream.from_pretrained(store, device_budget="256MiB", host_budget=0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (model(ids).logits.float() - ref(ids).logits.float()).abs().max().item()
    done("ok" if err < 1e-4 else "mismatch", err=err)
except Exception as e:
    done("run", error=f"{type(e).__name__}: {str(e)[:300]}")
"""


def families() -> list[str]:
    """transformers' MoE families that have no record here and no place in the derived test."""
    import transformers
    sys.path.insert(0, str(pathlib.Path.cwd()))
    from moestream.formats.families import FAMILIES
    from tests.integrations.test_derived_families import DERIVED
    root = pathlib.Path(transformers.__file__).parent / "models"
    return sorted(p.parent.name for p in root.glob("*/modeling_*.py")
                  if "use_experts_implementation" in p.read_text() and p.parent.name not in FAMILIES
                  and p.parent.name not in DERIVED)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", nargs="*")
    p.add_argument("--timeout", type=float, default=300, help="seconds a family may take")
    a = p.parse_args()
    for fam in a.family or families():
        try:
            out = subprocess.run([sys.executable, "-c", CHILD, fam], capture_output=True, text=True, timeout=a.timeout)
            lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
            print(lines[-1] if lines else json.dumps({"family": fam, "stage": "crash",
                                                      "error": out.stderr.strip()[-300:]}), flush=True)
        except subprocess.TimeoutExpired:
            print(json.dumps({"family": fam, "stage": "timeout", "error": f"over {a.timeout:.0f} s"}), flush=True)


if __name__ == "__main__":
    main()
