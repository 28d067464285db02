#!/usr/bin/env bash
# A second, shorter GPU call after benchmarks/gpu.sh (which measured issue 14's
# four shapes): where the Pallas kernels beat the scans, for the table
# implementation='auto' reads, and which Triton settings shorten their step.
# Each step compiles all its programs first, in 12 threads (16 cores there),
# then times them; every step ends by the call's budget (BUDGET_S = 400 s from
# the start):
#   1. the grid: nr.LSTM / nr.GRU with implementation='pallas' against the scans
#      (forward and training step) at batch 1-64 and hidden 32-256, 300 steps,
#      with the default settings and with loads a step ahead (prefetch), so
#      that one call gives the table for whichever becomes the default;
#   2. variants of the kernels at issue 14's two small shapes: the next step's
#      loads issued a step ahead (PallasSettings.prefetch; Triton's own
#      pipelining, num_stages=2, leaves the forward's loads alone and exceeds
#      shared memory at H = 128), fewer warps, 128-wide chunks;
#   3. the tests that failed on the GPU in the first call of 2026-12-04 (they
#      assumed the CPU's plan or interpreted kernels);
#   4. bidirectional layers at the two small shapes, Pallas against the scans:
#      the kernels run both directions in one launch since 2026-12-04 (a grid
#      over the directions), so Pallas' time should be about step 2's
#      one-directional 'pallas' row, not twice it;
#   5. in the time left: the XLA scans' plans (hoisted, loop, joint; unrolled
#      1, 4, 8), forced, at the suite's four shapes, never timed on a GPU
#      (_fused/_plans.py's thresholds are the CPU's), written after each layer.
#   bash benchmarks/gpu_grid.sh   (device tool: command "bash benchmarks/gpu_grid.sh", timeout_s 430)
# Then: python -m benchmarks.pallas_verdict --grid OUT/pallas_grid.json --commit SHA \
#   [--plan pallas/prefetch=1]
source "$(dirname "$0")/gpu_common.sh" grid_log.txt 400
step environment
{ nvidia-smi -L; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  $PY -c "import jax; d = jax.devices()[0]; print('jax', jax.__version__, d.device_kind)"
} 2>&1 | tee -a "$log"
shapes=""
for H in 32 64 128 256; do
  for B in 1 4 8 16 32 64; do
    shapes="$shapes${shapes:+,}${B}x300x$(( H / 2 > 16 ? H / 2 : 16 ))x$H"
  done
done
step grid
timeout $(limit 170) $PY -m benchmarks.gpu_plans --variants pallas pallas/prefetch=1 --jobs 12 \
  --compile-timeout 100 --rounds 3 --shapes "$shapes" --json "$out/pallas_grid.json" 2>&1 \
  | tee -a "$log"
step Triton variants
timeout $(limit 120) $PY -m benchmarks.gpu_plans --jobs 12 --compile-timeout 60 --rounds 3 \
  --shapes 1x1000x32x64,8x500x64x128 --json "$out/pallas_variants.json" \
  --variants pallas pallas/prefetch=1 pallas/prefetch=1,num_warps=4 pallas/num_stages=2 \
  pallas/num_warps=4 pallas/num_warps=2 pallas/chunk=128,hold_bytes=131072 2>&1 | tee -a "$log"
step tests
JAX_DEFAULT_MATMUL_PRECISION=highest timeout $(limit 60) $PY -m pytest -q -p no:cacheprovider \
  tests/test_pallas.py::test_a_jax_without_pallas_triton_backend \
  tests/test_fused.py::test_large_gru_batch_matches_generic \
  tests/test_fused.py::test_plan_differentiates_large_gru_batches_with_jax_on_the_cpu \
  2>&1 | tee -a "$log"
step bidirectional
timeout $(limit 50) $PY -m benchmarks.gpu_plans --bidirectional --variants pallas --jobs 8 \
  --compile-timeout 30 --rounds 3 --shapes 1x1000x32x64,8x500x64x128 \
  --json "$out/pallas_bidirectional.json" 2>&1 | tee -a "$log"
step scan plans, in the time left
timeout $(limit 600) $PY -m benchmarks.gpu_plans --jobs 12 --compile-timeout 90 --rounds 3 \
  --json "$out/scan_plans.json" 2>&1 | tee -a "$log"
rm -f "$out"/*.tmp
step done
