#!/usr/bin/env bash
# GPU checks and benchmarks in ONE device call (the device tool allows 600 s a
# call and 15 minutes a session, start-up included; the first five steps'
# limits add up to 460 s, every step ends by the call's budget, BUDGET_S = 540 s
# from the start, so that a second call (benchmarks/gpu_grid.sh) fits in the
# ~300 s left; session 34's two calls took 327 and 312 s, and a start about
# 30 s). Issue 14's measurements first:
#   1. the fused layers' tests on the GPU: cuDNN, the XLA scans (the GPU plan,
#      every scan unrolled, since session 34) and the Pallas kernels compiled by
#      Triton (their loads a step ahead since session 34, the multiply-adds
#      since session 35: never yet a test there). In 8 processes: test_pallas.py
#      and test_fused.py alone ran past 60 s in 4 on 2026-12-04;
#   2. the Pallas rows (nr.LSTM[pallas], nr.GRU[pallas]) beside the scans
#      forced (nr.LSTM[xla], nr.GRU[xla]: nr.LSTM is the kernels where 'auto'
#      picks them), 'auto' and PyTorch, at issue 14's two small shapes (its
#      record; at batch 64 and 256 'auto' runs the scans: step 6);
#   3. three kernel forms never timed, against the kernels' default and the
#      scans, at issue 14's two small shapes, then batch 1 and 8 at hidden 32
#      and 64, compiled in 12 threads: the kernels writing only the carries
#      and XLA rebuilding residuals and gate gradients
#      (PallasSettings.residuals='rebuilt', session 36: compiled for sm_90a the
#      LSTM's forward / backward barriers a step 22 / 28 -> 14 / 24 at
#      (1, ., 32, 64), 54 / 62 -> 38 / 54 at (8, ., 64, 128), the GRU's
#      20 / 26 -> 10 / 20 and 42 / 54 -> 22 / 42), alone and with the
#      float16 weights; the kernels' W_h in float16
#      (PallasSettings.recurrent_weights, session 36: TF32's mantissa, all of
#      W_h held at hidden 128; compiled for sm_90a, an LSTM step's 28 global
#      loads become 8 forward, 32 become 12 backward), and the products as
#      multiply-adds (PallasSettings.matmul='fma', session 35), one batch row a
#      program, in 2 or 1 warps (a step in one warp at hidden 32, two at 64, has 1-2
#      barriers where the dot form has 22: HISTORY.md, "read off the PTX");
#   4. benchmarks/multiblock_probe.py (session 36): an LSTM step at hidden 64
#      and 128 split over 1-8 blocks that exchange h through global memory
#      behind a grid-wide barrier (FlashRNN's design for hidden 128, whose W_h
#      no one block holds in float32), and one block holding W_h in float16
#      (TF32's mantissa): us a step, each checked against an XLA scan;
#   5. benchmarks/step_profile.py (session 36): where the kernels' forward and
#      training step spend their time on the device (the forward and backward
#      kernels, the matmuls, the XLA work between them), and cuDNN's, at issue
#      14's two small shapes, from jax's and PyTorch's profilers (the
#      residuals rebuilt at both, the multiply-adds at hidden 64, the float16
#      weights at 128);
#   then, in the time left:
#   6. the benchmark suite without the Pallas rows (flax.nnx, PyTorch on cuDNN,
#      the scans, cuDNN) at its four shapes: the table README.md shows, not
#      re-run since the GPU plan (it writes its JSON after each shape);
#   7. benchmarks/mosaic_probe.py: the Mosaic GPU design of HISTORY.md ("Toward
#      1.5x cuDNN"), an LSTM forward on wgmma in bfloat16, beside the Triton
#      kernels' forward. Never run on a GPU: it may fail to compile or run;
#      the step records the error and times the kernels;
#   8. the cuDNN accuracy/timing check.
# Each step writes its JSON as it goes, so a step cut off by its limit loses
# only what it had not finished. Everything lands in ${OUT:-out/gpu}, in at most
# 8 files (what the device tool brings back): log.txt and one JSON per step
# (the tests write none).
#   bash benchmarks/gpu.sh     (device tool: command "bash benchmarks/gpu.sh", timeout_s 560)
# Then at once, while the machine is warm (it goes back after 30 s idle), the
# second call with the budget the first left (its lease's budget_left_s, less
# ~20 s): BUDGET_S=<that> bash benchmarks/gpu_grid.sh.
# Before it, on the CPU after any change to the kernels: make test-gpu-jax (their tests and
# CUDA lowering on the GPU machine's jax 0.11.2; session 37 found a lowering only 0.10.2 took).
# Then, on any machine (JSON only): the issue's targets and the table
# implementation='auto' reads (_fused/_plans.py, PALLAS_FASTER):
#   python -m benchmarks.pallas_verdict OUT/pallas_results.json --commit SHA \
#       --sweep OUT/pallas_fma.json
# which also sets step 3's variants against PyTorch at issue 14's shapes and
# ranks them (the regions 'auto' would read with one: --grid
# OUT/pallas_fma.json --plan VARIANT); and step 5's profile as one table:
#   python -m benchmarks.step_profile --markdown OUT/step_profile.json
source "$(dirname "$0")/gpu_common.sh" log.txt 540
step environment
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  $PY -c "import jax, flax, torch; d = jax.devices()[0]; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, d, d.device_kind, d.client.platform_version)"
} 2>&1 | tee -a "$log"
step tests
# In full float32: they compare against float64 references at 1e-5.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout $(limit 120) $PY -m pytest -q -p no:cacheprovider -n 8 \
  tests/test_pallas.py tests/test_cudnn.py tests/test_fused.py tests/test_fused_padding.py \
  2>&1 | tee -a "$log"
step Pallas rows up to H = 256
timeout $(limit 110) $PY -m benchmarks.run --rounds 5 --json "$out/pallas_results.json" \
  --shapes 1x1000x32x64,8x500x64x128 \
  --impls '^(nr\.(LSTM|GRU)(\[(pallas|xla)\])?$|torch)' 2>&1 | tee -a "$log"
step Pallas residuals rebuilt, float16 weights, products as multiply-adds
timeout $(limit 120) $PY -m benchmarks.gpu_plans --jobs 12 --compile-timeout 85 --rounds 3 \
  --variants pallas pallas/residuals=rebuilt pallas/residuals=rebuilt,recurrent_weights=float16 \
  pallas/recurrent_weights=float16 \
  pallas/matmul=fma,state_elements=32,num_warps=2 pallas/matmul=fma,state_elements=32,num_warps=1 \
  --shapes 1x1000x32x64,8x500x64x128,1x300x16x32,8x300x32x64 \
  --json "$out/pallas_fma.json" 2>&1 | tee -a "$log"
step multi-block probe
timeout $(limit 40) $PY -m benchmarks.multiblock_probe --json "$out/multiblock_probe.json" 2>&1 \
  | tee -a "$log"
step where the step spends its time
timeout $(limit 70) $PY -m benchmarks.step_profile --jobs 12 --compile-timeout 40 \
  --shapes 1x1000x32x64,8x500x64x128 \
  --variants pallas pallas/residuals=rebuilt pallas/matmul=auto@1x1000x32x64 \
  pallas/recurrent_weights=float16@8x500x64x128 \
  --torch --json "$out/step_profile.json" 2>&1 \
  | tee -a "$log"
step suite without the Pallas rows, in the time left
timeout $(limit 100) $PY -m benchmarks.run --rounds 5 --json "$out/gpu_results.json" \
  --impls '^(nr\.(LSTM|GRU)$|nr\.LSTM\[cudnn\]|nr\.RNN\((Opt|GRU)|nnx\.RNN\((Opt|GRU)|torch)' \
  2>&1 | tee -a "$log"
step Mosaic GPU probe, in the time left
timeout $(limit 60) $PY -m benchmarks.mosaic_probe --json "$out/mosaic_probe.json" 2>&1 \
  | tee -a "$log"
step cuDNN check, in the time left
timeout $(limit 45) $PY -m benchmarks.cudnn_check --json "$out/cudnn_check.json" 2>&1 \
  | tee -a "$log"
rm -f "$out"/*.tmp  # a JSON being written when its step was cut off (the whole one stays)
step done
