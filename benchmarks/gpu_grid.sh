#!/usr/bin/env bash
# The Pallas kernels against the scans on a GPU, after the defaults the first
# call of 2026-12-04 (session 34) chose: the kernels load each step's inputs a
# step ahead (PallasSettings.prefetch), and the scans on a GPU hoist the input
# projections and unroll 8 times (_fused/_plans.py). Every step ends by the
# call's budget (BUDGET_S = 400 s from the start) and writes as it goes:
#   1. issue 14's record: nr.LSTM / nr.GRU ('auto'), the scans forced ([xla]),
#      the kernels ([pallas]) and PyTorch (cuDNN) at the suite's three shapes up
#      to H = 256;
#   2. the Pallas and fused-layer tests under Triton (with the kernels' loads
#      ahead and the scans' GPU plan; cut off at 60 s in 4 processes in session
#      34's second call, hence 8 now);
#   3. the grid for the table implementation='auto' reads: 'pallas' against
#      the scans (forward and training step) at batch 1-64 and hidden 32-256,
#      300 steps, compiled first in 12 threads (16 cores there; 144 programs
#      took 166 s on 2026-12-04), written after each shape.
#   bash benchmarks/gpu_grid.sh   (device tool: command "bash benchmarks/gpu_grid.sh", timeout_s 430)
# Then: python -m benchmarks.pallas_verdict --grid OUT/pallas_grid.json --commit SHA
source "$(dirname "$0")/gpu_common.sh" grid_log.txt 400
step environment
{ nvidia-smi -L; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  $PY -c "import jax, torch; d = jax.devices()[0]; print('jax', jax.__version__, 'torch', torch.__version__, d.device_kind)"
} 2>&1 | tee -a "$log"
step suite rows up to H = 256
timeout $(limit 110) $PY -m benchmarks.run --rounds 5 --json "$out/pallas_results.json" \
  --shapes 1x1000x32x64,8x500x64x128,64x100x128x256 \
  --impls '^(nr\.(LSTM|GRU)(\[(pallas|xla)\])?$|torch)' 2>&1 | tee -a "$log"
step tests
JAX_DEFAULT_MATMUL_PRECISION=highest timeout $(limit 60) $PY -m pytest -q -p no:cacheprovider -n 8 \
  tests/test_pallas.py tests/test_fused.py 2>&1 | tee -a "$log"
shapes=""
for H in 32 64 128 256; do
  for B in 1 4 8 16 32 64; do
    shapes="$shapes${shapes:+,}${B}x300x$(( H / 2 > 16 ? H / 2 : 16 ))x$H"
  done
done
step grid, in the time left
timeout $(limit 600) $PY -m benchmarks.gpu_plans --variants pallas --jobs 12 \
  --compile-timeout 150 --rounds 3 --shapes "$shapes" --json "$out/pallas_grid.json" 2>&1 \
  | tee -a "$log"
rm -f "$out"/*.tmp
step done
