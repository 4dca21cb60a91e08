#!/usr/bin/env bash
# Runtime-only smoke stage: a venv made by the README's set-up command alone (no transformers, peft, tensorboard)
# trains a short adapter on the default model, then generates with it, merges it, exports it in every format and
# evaluates it. Any command that imports a test-only package, or fails, fails the stage.
#   VENV=.venv-runtime bash scripts/setup.sh && bash scripts/smoke_runtime.sh .venv-runtime
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-runtime}
LT="$VENV/bin/leantune"
for pkg in transformers peft tensorboard pytest lm_eval; do
  if "$VENV/bin/python" -c "import $pkg" 2>/dev/null; then echo "smoke: $pkg is installed in $VENV; not a runtime-only venv" >&2; exit 1; fi
done
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
run() { echo "+ leantune $*"; "$LT" "$@"; }
run finetune lora --out_dir "$OUT/lora" --train.max_steps 2 --train.global_batch_size 4 --eval.exact_match false \
  --eval.max_batches 1 --eval.sample_new_tokens 0 --threads 2
A="$OUT/lora/final"
run generate --adapter "$A" --prompt "Reverse the letters: abc" --max_new_tokens 8
run merge --adapter "$A" --out_dir "$OUT/merged"
run export --adapter "$A" --format peft --out_dir "$OUT/peft"
run generate --adapter "$OUT/peft" --prompt "Uppercase: cat" --max_new_tokens 8
run export --adapter "$A" --format hf --out_dir "$OUT/hf"
run export --adapter "$A" --format gguf --out_dir "$OUT/gguf"
run evaluate --adapter "$A" --max_batches 1 --exact_match false
# lm-eval tasks need the optional extra: without it, one clear line naming it (exit 2), before any model loads
echo "+ leantune evaluate --tasks mmlu_exemplars (without the lm-eval extra)"
if msg=$("$LT" evaluate --tasks mmlu_exemplars 2>&1); then echo "smoke: --tasks ran without lm-eval" >&2; exit 1; fi
case "$msg" in *"pip install 'leantune[eval]'"*) echo "$msg" ;; *) echo "smoke: unclear error without lm-eval: $msg" >&2; exit 1 ;; esac
for f in "$OUT/merged/config.json" "$OUT/peft/adapter_config.json" "$OUT/hf/model.safetensors" "$OUT/gguf/model-f16.gguf"; do
  [ -s "$f" ] || { echo "smoke: missing $f" >&2; exit 1; }
done
echo "runtime-only smoke stage: passed"
