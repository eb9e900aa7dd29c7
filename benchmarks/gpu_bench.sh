#!/usr/bin/env bash
# `dpo-sims bench` on one NVIDIA GPU (sized for an H200, 141 GB), plus the GPU's f32 GEMM throughput.
#
#   bash benchmarks/gpu_bench.sh [--out DIR] [--wheelhouse DIR] [--no-install]   # on the GPU machine
#   bash benchmarks/gpu_bench.sh --cpu-smoke [--out DIR]                         # anywhere: tiny sizes, CPU
#
# 1. Installs JAX's CUDA plugin matching the installed jax version (extra `cuda13` when the driver
#    reports CUDA >= 13, else `cuda12`; pip metadata of jax 0.10: both extras exist) and this package
#    (editable, from the checkout this script lives in). Skipped when JAX already sees a GPU, with
#    --no-install, and with --cpu-smoke. --wheelhouse DIR installs offline from wheels in DIR
#    (`pip download "jax[cuda12]==<version>" -d DIR` on a machine with internet access).
# 2. Runs the `dpo-sims bench` measurement plan (same code, same printout, same JSON keys) with the
#    sizes below: headline C = 65536, N = 4096, d = 256, T = 200 (4.3 TFLOP per step-sweep; the
#    largest arrays are the C×N = 65536×4096 float32 margins, 1 GiB each, so it fits 141 GB with
#    room to spare). Peak-RSS subprocesses are skipped (host memory says nothing about a GPU) and so
#    is the PyTorch loop unless --torch is given.
# 3. Measures the GPU's float32 GEMM throughput: an 8192³ jnp.matmul at default precision (TF32
#    tensor cores where XLA uses them) and at precision=HIGHEST (true f32), and prints
#    engine_gflops / that, the fraction of the device's GEMM speed the engine reaches.
# Output: the bench text, then one JSON object with everything (also in DIR/gpu_bench.json).
# Expected time on an H200 (not yet measured): install 1-2 min online, bench a few minutes (mostly compilation).
# --cpu-smoke: 290 s wall (89 s CPU) on 2 busy cores.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$here/gpu_bench_out}"
smoke=0
install=1
torch_flag="--no-torch"
wheelhouse=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=1; install=0 ;;
    --no-install) install=0 ;;
    --torch) torch_flag="" ;;
    --out) out="$2"; shift ;;
    --wheelhouse) wheelhouse="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_bench.sh: unknown argument '$1' (use --cpu-smoke, --no-install, --torch, --out DIR, --wheelhouse DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py="$(command -v python3)"; fi
fi

if [ "$smoke" = 1 ]; then
  export JAX_PLATFORMS=cpu
elif [ "$install" = 1 ] && ! "$py" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
  jax_version="$("$py" -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "")"
  cuda_major="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)"
  extra=cuda12
  if [ -n "$cuda_major" ] && [ "$cuda_major" -ge 13 ]; then extra=cuda13; fi
  spec="jax[$extra]${jax_version:+==$jax_version}"
  pip_args=()
  if [ -n "$wheelhouse" ]; then pip_args=(--no-index --find-links "$wheelhouse"); fi
  echo "# installing $spec and dpo-dynamics (driver CUDA ${cuda_major:-unknown})" >&2
  "$py" -m pip install -q "${pip_args[@]}" "$spec"
  "$py" -m pip install -q "${pip_args[@]}" -e "$here"
fi

cd "$here"
SMOKE="$smoke" OUTDIR="$out" TORCH_FLAG="$torch_flag" "$py" - <<'PY'
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from benchmarks import suite
from sims import bench

smoke = os.environ["SMOKE"] == "1"
if not smoke and jax.default_backend() != "gpu":
    raise SystemExit(f"gpu_bench.sh: JAX sees no GPU (backend {jax.default_backend()!r}, devices {jax.devices()}); "
                     "install the CUDA plugin (drop --no-install) or run with --cpu-smoke")
if smoke:  # tiny sizes: checks the script end to end on a CPU in about a minute
    plan = dict(headline=dict(c=64, n=128, d=16, steps=10), roofline_c=(16, 64), torch_configs=1, numpy_configs=2,
                vmap_configs=16, population=dict(c=64, d=16, steps=5), population_vs_core=dict(c=16, d=32, steps=3),
                exponent_base=dict(c=32, n=64, d=16, steps=8), exponent_factors=(0.5, 1), rss_configs=(100,),
                rss=dict(n=64, d=16, steps=2, chunk_size=64), minibatch=dict(n=1024, d=8, batch_size=64, steps=20),
                repeats=1)
    gemm_size = 512
else:  # one H200: C·N·d = 6.9e10 per step; the largest arrays are C×N float32 (1 GiB)
    plan = dict(headline=dict(c=65536, n=4096, d=256, steps=200), roofline_c=(4096, 16384, 65536),
                torch_configs=4, numpy_configs=4, vmap_configs=1024,
                population=dict(c=65536, d=256, steps=100), population_vs_core=dict(c=4096, d=512, steps=20),
                exponent_base=dict(c=16384, n=2048, d=128, steps=100), exponent_factors=(0.5, 1, 2, 4),
                rss_configs=(), rss=dict(n=1024, d=64, steps=10, chunk_size=1024),
                minibatch=dict(n=65536, d=16, batch_size=128, steps=400), repeats=2)
    gemm_size = 8192
suite.SIZES["full"] = {**suite.SIZES["full"], **plan}  # the same measurement plan at these sizes

path = os.path.join(os.environ["OUTDIR"], "bench.json")
flags = ["--json", path, "--no-rss"] + ([os.environ["TORCH_FLAG"]] if os.environ["TORCH_FLAG"] else [])
parser = argparse.ArgumentParser(prog="dpo-sims")
bench.register(parser.add_subparsers())
args = parser.parse_args(["bench"] + flags)
t0 = time.perf_counter()
rc = args.func(args)
bench_seconds = time.perf_counter() - t0
rep = json.load(open(path))


def matmul_tflops(size, precision, repeats=5):
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best / 1e12


gemm = {"size": gemm_size, "dtype": "float32",
        "default_precision_tflops": matmul_tflops(gemm_size, None),
        "highest_precision_tflops": matmul_tflops(gemm_size, jax.lax.Precision.HIGHEST)}
summary = {
    "device": str(jax.devices()[0]), "backend": jax.default_backend(), "jax": jax.__version__, "smoke": smoke,
    "bench_seconds": bench_seconds, "bench_exit_code": rc, "matmul": gemm,
    "engine_gflops": rep["engine_gflops"],
    "engine_fraction_of_matmul_default": rep["engine_gflops"] / (1e3 * gemm["default_precision_tflops"]),
    "engine_fraction_of_matmul_highest": rep["engine_gflops"] / (1e3 * gemm["highest_precision_tflops"]),
    "bench": rep,
}
out = os.path.join(os.environ["OUTDIR"], "gpu_bench.json")
with open(out, "w") as fh:
    json.dump(summary, fh, indent=2, default=float)
print(f"# f32 matmul {gemm_size}^3: {gemm['default_precision_tflops']:.1f} TFLOP/s (default precision), "
      f"{gemm['highest_precision_tflops']:.1f} TFLOP/s (HIGHEST); engine {rep['engine_gflops'] / 1e3:.2f} TFLOP/s = "
      f"{summary['engine_fraction_of_matmul_default']:.3f} / {summary['engine_fraction_of_matmul_highest']:.3f} of them")
print(json.dumps(summary, default=float))
PY
