#!/usr/bin/env bash
# Runtime-only smoke stage: a venv made by the README's set-up command alone (no transformers, peft, tensorboard)
# trains a short adapter on the default model, then generates with it (also int4 + --compile), merges it, exports it in every format,
# evaluates it and serves it (one chat completion over loopback). Any command that imports a test-only package, or fails, fails the stage.
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
# the compiled decode step (inductor, from the runtime install alone) over an int4 base with the adapter unmerged
run generate --adapter "$A" --quantize int4 --compile true --prompt "Reverse the letters: abc" --max_new_tokens 8
run merge --adapter "$A" --out_dir "$OUT/merged"
run export --adapter "$A" --format peft --out_dir "$OUT/peft"
run generate --adapter "$OUT/peft" --prompt "Uppercase: cat" --max_new_tokens 8
run export --adapter "$A" --format hf --out_dir "$OUT/hf"
run export --adapter "$A" --format gguf --out_dir "$OUT/gguf"
run evaluate --adapter "$A" --max_batches 1 --exact_match false
# serve: the adapter behind the OpenAI API on a loopback port, one chat completion, then SIGTERM (a clean exit)
PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "+ leantune serve --adapter lora=$A --port $PORT"
"$LT" serve --adapter "lora=$A" --port "$PORT" --threads 2 --max_new_tokens 8 --log_level warning &
SERVER=$!
for _ in $(seq 1 300); do "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health')" \
  2>/dev/null && break; kill -0 "$SERVER" || exit 1; sleep 0.5; done
"$VENV/bin/python" - "$PORT" <<'PY'
import json, sys, urllib.request
body = {"model": "lora", "messages": [{"role": "user", "content": "Uppercase: cat"}], "max_tokens": 8, "temperature": 0}
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(req, timeout=120))
assert answer["choices"][0]["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] > 0, answer
print("serve answered:", repr(answer["choices"][0]["message"]["content"]))
PY
kill -TERM "$SERVER"
wait "$SERVER"
# lm-eval tasks need the optional extra: without it, one clear line naming it (exit 2), before any model loads
echo "+ leantune evaluate --tasks mmlu_exemplars (without the lm-eval extra)"
if msg=$("$LT" evaluate --tasks mmlu_exemplars 2>&1); then echo "smoke: --tasks ran without lm-eval" >&2; exit 1; fi
# the install line names the Python that runs leantune and lm-eval's own requirement (works outside the project too)
case "$msg" in *"-m pip install 'lm-eval>=0.4.5,<0.5'"*) echo "$msg" ;; *) echo "smoke: unclear error without lm-eval: $msg" >&2; exit 1 ;; esac
for f in "$OUT/merged/config.json" "$OUT/peft/adapter_config.json" "$OUT/hf/model.safetensors" "$OUT/gguf/model-f16.gguf"; do
  [ -s "$f" ] || { echo "smoke: missing $f" >&2; exit 1; }
done
echo "runtime-only smoke stage: passed"
