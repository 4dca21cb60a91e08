"""`--compile` with `--adapter` in a new process: inductor's on-disk cache must serve the compiled decode step again
(the graph and its cache key may not depend on anything that changes per process: ids, hash order, paths), and an
adapter that differs only in LoRA's alpha or dropout must reuse it too (the scale is a graph input, not a constant;
eval's dropout is not traced)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_support import random_lora

from leantune.decode import compile as lt_compile

pytestmark = pytest.mark.skipif(lt_compile.compile_unavailable_reason() is not None,
                                reason="inductor cannot compile here (no C++ compiler)")

CHILD = """
import json, sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from leantune.decode.generate import generate_tokens
from leantune.inference import load_for_inference

torch.set_num_threads(1)
out = []
for adapter in sys.argv[3:]:  # each on a fresh model, dynamo reset in between: as if in a new process
    model, tokenizer, _, _ = load_for_inference(Path(sys.argv[1]), adapter=Path(adapter), quantize=sys.argv[2] or None)
    ids = torch.tensor(tokenizer.encode("Tell me about rivers."))
    compiled = list(generate_tokens(model, ids, 6, compiled=True))
    out.append({"compiled": compiled, "eager": list(generate_tokens(model, ids, 6)),
                "inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"])})
    torch._dynamo.reset()  # forgets the compiled code (not the disk cache)
    counters.clear()
print(json.dumps(out))
"""


def run_child(checkpoint: Path, quantize: str, cache: Path, hash_seed: int, *adapters: Path) -> list[dict]:
    """Decode with each adapter in a fresh Python process (its own hash seed) with inductor's cache in `cache`:
    per adapter, the tokens (compiled and eager) and the cache counters."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONHASHSEED": str(hash_seed)}
    env.pop("TORCH_LOGS", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), quantize, *map(str, adapters)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def hit(run: dict) -> bool:
    """Inductor's compiled graph and AOT autograd's came from the disk cache, nothing was compiled anew."""
    return (run["inductor"].get("fxgraph_cache_hit", 0) >= 1 and run["aot"].get("autograd_cache_hit", 0) >= 1
            and not run["inductor"].get("fxgraph_cache_miss") and not run["aot"].get("autograd_cache_miss"))


@pytest.mark.slow  # two fresh processes that import torch and compile (one cold, two from the cache): ~40 s of CPU
@pytest.mark.parametrize("quantize", ["int8"])
def test_a_new_process_with_a_saved_adapter_hits_inductors_cache(tiny_checkpoint, tmp_path, quantize):
    """A finetune's saved adapter folder (a tiny random base): the first process compiles and fills the cache, a
    second process with the same folder loads the graphs from it; so does an adapter with another alpha and dropout."""
    adapter = random_lora(tiny_checkpoint, tmp_path / "lora")
    other = tmp_path / "lora-alpha"  # the same tensors, another alpha (scale) and dropout, the same shapes
    shutil.copytree(adapter, other)
    manifest = json.loads((other / "leantune.json").read_text())
    manifest["method_args"].update(alpha=5.0, dropout=0.2)
    (other / "leantune.json").write_text(json.dumps(manifest))
    cache = tmp_path / "inductor"

    [cold] = run_child(tiny_checkpoint, quantize, cache, 1, adapter)
    assert cold["inductor"].get("fxgraph_cache_miss", 0) >= 1 and not cold["inductor"].get("fxgraph_cache_hit"), cold
    warm, alpha = run_child(tiny_checkpoint, quantize, cache, 2, adapter, other)
    assert hit(warm), warm
    assert warm["compiled"] == cold["compiled"] == cold["eager"]
    assert hit(alpha), alpha
    assert alpha["compiled"] == alpha["eager"] != cold["eager"], "alpha must change the tokens for this to show much"
