#!/usr/bin/env bash
# GPU checks and benchmarks, one run: the fused layers' tests on the GPU (the
# cuDNN path, and the Pallas kernels compiled by Triton for the first time
# here), the cuDNN accuracy/timing check, and the benchmark suite (flax.nnx,
# PyTorch on cuDNN, ours: the scans, cuDNN, and nr.LSTM[pallas] /
# nr.GRU[pallas]). Writes to ${OUT:-out/gpu}.
#   bash benchmarks/gpu.sh
set -uo pipefail
out=${OUT:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import jax, flax, torch; d = jax.devices()[0]; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, d, d.device_kind, d.client.platform_version)"
} 2>&1 | tee "$out/env.txt"
# Tests in full float32: they compare against float64 references at 1e-5.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 $PY -m pytest -q -p no:cacheprovider -n 4 \
  tests/test_cudnn.py tests/test_fused.py tests/test_pallas.py tests/test_fused_padding.py \
  2>&1 | tail -40 | tee "$out/pytest.txt"
timeout 150 $PY -m benchmarks.cudnn_check --json "$out/cudnn_check.json" 2>&1 | tee "$out/cudnn_check.txt"
timeout 450 $PY -m benchmarks.run --rounds 5 --json "$out/gpu_results.json" \
  --impls '^(nr\.(LSTM|GRU|RNN\((Opt|GRU))|nnx\.RNN\((Opt|GRU)|torch)' 2>&1 \
  | tee "$out/bench.txt" | tail -70
