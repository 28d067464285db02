#!/usr/bin/env bash
# GPU checks and benchmarks in ONE device call (the device tool allows 600 s a
# call and 15 minutes a session, start-up included; the first five steps'
# limits add up to 530 s, every step ends by the call's budget, BUDGET_S = 560 s
# from the start, and the last GPU run took about 100 s in all):
#   1. the fused layers' tests on the GPU: cuDNN, the XLA scans, and the Pallas
#      kernels, compiled by XLA's Triton for the first time here;
#   2. the benchmark suite without the Pallas rows (flax.nnx, PyTorch on cuDNN,
#      the scans, cuDNN) at its four shapes;
#   3. the Pallas rows (nr.LSTM[pallas], nr.GRU[pallas]) beside PyTorch and the
#      scans at the three shapes up to H = 256 (issue 14's targets). Their
#      Triton compiles alone took about 105 s on a 2-core CPU (the `seconds`
#      of benchmarks/gpu/triton_resources_jax0.11.2_triton3.6.0.json, three
#      kernels a layer and shape; 90 s of it at H = 256);
#   4. the cuDNN accuracy/timing check;
#   5. the Pallas kernels' size variants at (8, 500, 64, 128) (benchmarks/
#      gpu_plans.py --pallas: weights held or not, warps, chunk), to choose
#      internal.PallasSettings' defaults: 5 variants of 3 kernels for each
#      layer, about 77 s of Triton compiles on a 2-core CPU (triton 3.6.0;
#      benchmarks/RESULTS.md, "Pallas kernels"), and the loop over column
#      chunks (unrolled_chunks=0, about 11 s more), and loads a step ahead
#      (prefetch=1). The whole step took 44 s on the H200 on 2026-12-04;
#   6. the Pallas rows at (256, 50, 256, 512), in whatever time is left: there
#      the kernels loop over their column chunks (unrolled, one kernel took
#      Triton 12 minutes to compile on a 2-core CPU; looped, 5-17 s a kernel).
# Each step writes its JSON as it goes (after each shape; gpu_plans after each
# layer), so a step cut off by its limit loses only what it had not finished.
# Everything lands in ${OUT:-out/gpu}, in at most 8 files (what the device tool
# brings back): log.txt and one JSON per step.
#   bash benchmarks/gpu.sh     (device tool: command "bash benchmarks/gpu.sh", timeout_s 570)
# A second, shorter call (the grid of shapes for the table, Triton variants):
# benchmarks/gpu_grid.sh.
# Then, on any machine (JSON only): the issue's targets, the table
# implementation='auto' reads (_fused/_plans.py, PALLAS_FASTER) and the best
# size variant, for internal.PallasSettings' defaults:
#   python -m benchmarks.pallas_verdict OUT/pallas_results.json OUT/pallas_large.json \
#       --sweep OUT/pallas_sweep.json --commit SHA
source "$(dirname "$0")/gpu_common.sh" log.txt 560
step environment
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  $PY -c "import jax, flax, torch; d = jax.devices()[0]; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, d, d.device_kind, d.client.platform_version)"
} 2>&1 | tee -a "$log"
step tests
# In full float32: they compare against float64 references at 1e-5.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout $(limit 90) $PY -m pytest -q -p no:cacheprovider -n 4 \
  tests/test_pallas.py tests/test_cudnn.py tests/test_fused.py tests/test_fused_padding.py \
  2>&1 | tee -a "$log"
step suite without the Pallas rows
timeout $(limit 100) $PY -m benchmarks.run --rounds 5 --json "$out/gpu_results.json" \
  --impls '^(nr\.(LSTM|GRU)$|nr\.LSTM\[cudnn\]|nr\.RNN\((Opt|GRU)|nnx\.RNN\((Opt|GRU)|torch)' \
  2>&1 | tee -a "$log"
step Pallas rows up to H = 256
timeout $(limit 180) $PY -m benchmarks.run --rounds 5 --json "$out/pallas_results.json" \
  --shapes 1x1000x32x64,8x500x64x128,64x100x128x256 \
  --impls '^(nr\.(LSTM|GRU)(\[(pallas|xla)\])?$|torch)' 2>&1 | tee -a "$log"
step cuDNN check
timeout $(limit 45) $PY -m benchmarks.cudnn_check --json "$out/cudnn_check.json" 2>&1 \
  | tee -a "$log"
step Pallas size variants
timeout $(limit 115) $PY -m benchmarks.gpu_plans --pallas --shapes 8x500x64x128 --rounds 3 \
  --json "$out/pallas_sweep.json" 2>&1 | tee -a "$log"
step Pallas rows at H = 512, in the time left
timeout $(limit 600) $PY -m benchmarks.run --rounds 5 --json "$out/pallas_large.json" \
  --shapes 256x50x256x512 \
  --impls '^(nr\.(LSTM|GRU)(\[(pallas|xla)\])?$|torch)' 2>&1 | tee -a "$log"
rm -f "$out"/*.tmp  # a JSON being written when its step was cut off (the whole one stays)
step done
