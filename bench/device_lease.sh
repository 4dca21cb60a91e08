#!/bin/bash
# One call's worth of measurements for a short lease of a GPU machine (its CPU is an Intel Xeon with AMX), in the
# order they matter, each stage bounded so that the whole run ends within ~9 minutes and whatever finished is kept:
#   1. the GPU tables: LoRA bf16-true and QLoRA nf4-dq on Llama-3.2-1B, batch 4, against HF peft and LitGPT
#      (bench/train_gpu.py, one JSON);
#   2. the CUDA tests (GPU precisions, the 1-rank nccl FSDP run, the distributed tests' CPU ranks on a GPU machine);
#   3. CPU training on that machine's AMX cores, 2 threads: leantune's --precision auto (bf16-mixed there) against its
#      own fp32 and against transformers + peft under autocast (bench/lora_cpu.py, issue 25's AMX targets), on a
#      random-weight folder of the default model's architecture (the real weights do not travel; speed does not
#      depend on them);
#   4. the batch-1 rows of the same table with the time left (join the JSONs with train_gpu.py --merge).
#
# Before the call, in the repository root here (the peers and wheels travel as ignored folders named in `carry`):
#   mkdir -p .peers && cp ../shared/bench/*.py .peers/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     bitsandbytes==0.50.2 litgpt==0.5.13 jsonargparse==4.41.0 docstring-parser typeshed-client gguf    # ~43 MB
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl/leantune 'jsonargparse>=4.46'
# (LitGPT 0.5.13 pins jsonargparse <= 4.41 while leantune's command line needs >= 4.46: the peers import the first,
# the tests the second, from two folders)
# and add `/.peers/` and `/.whl/` to .git/info/exclude. Then run `bash bench/device_lease.sh` there with carry
# [".whl", ".peers"]; results land in $OUT (a new temporary folder without it, printed first): env.txt, train_gpu_*.json, *.log.
set -u
OUT=${OUT:-$(mktemp -d -t leantune_lease.XXXXXX)}
mkdir -p "$OUT" && echo "results in $OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 3
fi
TESTS_PATH=${PYTHONPATH:-}
if ls .whl/leantune/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-leantune \
        .whl/leantune/*.whl && TESTS_PATH=/tmp/site-leantune${PYTHONPATH:+:$PYTHONPATH} || exit 3
fi
BUDGET=${LEASE_BUDGET_S:-540}
left() { echo $((BUDGET - SECONDS)); }
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; lscpu | grep -E 'Model name|^CPU\(s\)';
  grep -o -w -E 'amx_tile|amx_bf16|amx_int8|avx512_bf16|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' '; echo;
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$OUT/env.txt"
GPU_BENCH="python3 bench/train_gpu.py --peer_dir .peers --steps 10 --timeout 150"

# 1. the GPU headline table (~150 s: 2 leantune and 4 peer processes)
timeout 300 $GPU_BENCH --models Llama-3.2-1B --batches 4 --settings bf16-true,bf16-true+bnb.nf4-dq \
    --out "$OUT/train_gpu_main.json" 2>&1 | tee "$OUT/train_gpu_main.log"

# 2. the CUDA tests (~20 s)
PYTHONPATH=$TESTS_PATH timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_precision.py tests/test_distributed.py \
    -k "not readme_commands" -rs 2>&1 | tail -40 | tee "$OUT/pytest_cuda.log"

# 3. AMX CPU training, 2 threads (the random folder comes from train_gpu.py's own writer, on the CPU)
CKPT=/tmp/leantune_bench_ckpt_cpu/SmolLM2-135M
if [ "$(left)" -gt 150 ]; then
    CUDA_VISIBLE_DEVICES= timeout 60 python3 bench/train_gpu.py --make_ckpt \
        "{\"model\": \"SmolLM2-135M\", \"ckpt\": \"$CKPT\", \"device\": \"cpu\"}" >/dev/null
    CUDA_VISIBLE_DEVICES= timeout $(( $(left) - 60 )) python3 bench/lora_cpu.py --checkpoint_dir "$CKPT" \
        --precision auto --threads 2 --steps 4 --rounds 3 2>&1 | tail -30 | tee "$OUT/lora_cpu_amx.log"
    cp bench/results/lora_cpu_bf16-mixed.json "$OUT/lora_cpu_amx.json" 2>/dev/null
fi

# 4. the rest of the GPU grid with what is left
if [ "$(left)" -gt 60 ]; then
    timeout $(( $(left) - 10 )) $GPU_BENCH --models Llama-3.2-1B --batches 1 \
        --settings bf16-true,bf16-true+bnb.nf4-dq --out "$OUT/train_gpu_batch1.json" 2>&1 | tee "$OUT/train_gpu_batch1.log"
fi
echo "lease script done after ${SECONDS}s"
