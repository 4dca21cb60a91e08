#!/usr/bin/env bash
# Build llama-cpp-python (pinned in bench/requirements-llama-cpp.txt) into the project's venv, so that one
# process can import both leantune and llama_cpp for bench/decode_cpu.py --llama_cpp. Bench only, never CI.
#
#   bash bench/llama_cpp_setup.sh            # installs into .venv
#   VENV=/path/to/venv bash bench/llama_cpp_setup.sh
#   FORCE=1 bash bench/llama_cpp_setup.sh    # rebuild although the pinned version is installed
#
# Why the flags: llama.cpp's default native build (-march=native) also enables its AMX-INT8 kernels, whose q8_0
# path dies with SIGILL on cloud VMs that report AMX in cpuid but do not let the guest use it. So the build is
# not native: it names the x86 extensions explicitly, and only those this CPU lists in /proc/cpuinfo
# (AVX-512 F/BW/DQ/VL, plus VBMI, VNNI and BF16 when present). AMX stays off.
# The build runs about 140 compile steps (28 minutes at nice 19 on a busy 2-core VM): on a shared machine run it
# in the background under nice, e.g.
#   nohup nice -n 19 bash bench/llama_cpp_setup.sh > llama-build.log 2>&1 &
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
venv="${VENV:-$root/.venv}"
py="$venv/bin/python"
[ -x "$py" ] || { echo "llama_cpp_setup: no Python at $py (set VENV to the project's virtual environment)" >&2; exit 1; }

pin="$(grep -o '^llama-cpp-python==[^ ]*' "$here/requirements-llama-cpp.txt" | cut -d= -f3)"
have="$("$py" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)"
if [ "$have" = "$pin" ] && [ -z "${FORCE:-}" ]; then
  echo "llama_cpp_setup: llama-cpp-python $pin is already installed in $venv (FORCE=1 rebuilds it)"
  exit 0
fi

flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
args="$args -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
if has avx512f && has avx512bw && has avx512dq && has avx512vl; then
  args="$args -DGGML_AVX512=ON"
  has avx512vbmi && args="$args -DGGML_AVX512_VBMI=ON"
  has avx512_vnni && args="$args -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args="$args -DGGML_AVX512_BF16=ON"
fi
# The benchmark needs the library only: skip llama.cpp's examples, tools, tests and the multimodal (llava) part.
args="$args -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
args="$args -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF"
echo "llama_cpp_setup: CMAKE_ARGS=$args"
export CMAKE_ARGS="$args"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$py" -m pip install --no-cache-dir --force-reinstall --no-deps -v -r "$here/requirements-llama-cpp.txt"
# llama-cpp-python's own runtime dependencies (numpy, typing-extensions, diskcache, jinja2), without upgrading
# anything the project already pins.
"$py" -m pip install diskcache
"$py" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'system info:', llama_cpp.llama_print_system_info().decode())"
