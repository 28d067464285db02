"""The benchmark suite's bookkeeping (no timing: synthetic samples in, numbers out)."""

import json
import re
import subprocess
import types

import pytest

import nnx_recurrent as nr
from benchmarks import run


def result(impl, fwd, train, shape=(2, 3, 4, 5), library='ours'):
  r = run.Result(shape, impl, 'lstm', library, fwd_samples=list(fwd), train_samples=list(train))
  r.fwd_ms, r.train_ms = sorted(fwd)[len(fwd) // 2], sorted(train)[len(train) // 2]
  return r


def test_ratios_are_ratios_of_medians_with_the_per_round_range():
  ours = result('nr.LSTM', [2.0, 4.0, 3.0], [10.0, 30.0, 20.0])
  theirs = result('nnx.RNN(OptimizedLSTMCell)', [4.0, 4.0, 6.0], [20.0, 20.0, 80.0],
                  library='flax.nnx')
  (row,) = run.ratios([ours, theirs])
  assert row['fwd_ratio'] == pytest.approx(3.0 / 4.0)
  assert row['train_ratio'] == pytest.approx(20.0 / 20.0)
  # per round: fwd 0.5, 1.0, 0.5; train 0.5, 1.5, 0.25
  assert row['fwd_round_ratios'] == pytest.approx([0.5, 0.5, 1.0])
  assert row['train_round_ratios'] == pytest.approx([0.25, 0.5, 1.5])
  assert (row['fwd_target'], row['train_target']) == (1.0, 0.75)
  assert row['fwd_met'] and not row['train_met']
  table = run.ratio_table([row])
  assert '| 0.75 [0.50-1.00] (<= 1.00 met) | 1.00 [0.25-1.50] (<= 0.75 MISSED) |' in table


def test_pairs_missing_an_implementation_are_left_out():
  assert run.ratios([result('nr.LSTM', [1.0], [1.0])]) == []


def test_readme_table_from_json_results():
  results = [dict(shape=[8, 500, 64, 128], impl='nr.LSTM', train_ms=34.04),
             dict(shape=[8, 500, 64, 128], impl='torch.nn.LSTM', train_ms=25.5)]
  lines = run.readme_table(results).splitlines()
  assert lines[0].startswith('| (B, T, I, H) | `nr.RNN(OptimizedLSTMCell)` |')
  assert lines[2] == '| (8, 500, 64, 128) | n/a | n/a | 34.0 | 25.5 | n/a | n/a | n/a | n/a |'


def test_model_flops():
  B, T, I, H = 2, 3, 4, 5
  for family, G in (('lstm', 4), ('gru', 3)):
    forward = B * T * (I * G * H + H * G * H) * 2  # x W_i, h W_h
    backward = B * T * (G * H * H + I * G * H + H * G * H) * 2  # dgates W_h^T, dW_i, dW_h
    assert run.model_flops(family, B, T, I, H) == forward
    assert run.model_flops(family, B, T, I, H, train=True) == forward + backward


def test_summary_across_runs():
  def row(fwd, train):
    return dict(shape=[1, 2, 3, 4], ours='nr.GRU', theirs='nnx.RNN(GRUCell)', fwd_ratio=fwd,
                train_ratio=train, fwd_target=1.0, train_target=0.75)

  table = run.summary_table([[row(0.9, 0.8)], [row(1.1, 0.7)], [row(0.95, 0.74)]])
  lines = table.splitlines()
  assert lines[2] == ('| (1, 2, 3, 4) | nr.GRU / nnx.RNN(GRUCell) | fwd | 1.00 | 0.90, 1.10, 0.95 '
                      '| 0.95 | 2/3 |')
  assert lines[3] == ('| (1, 2, 3, 4) | nr.GRU / nnx.RNN(GRUCell) | train | 0.75 '
                      '| 0.80, 0.70, 0.74 | 0.74 | 2/3 |')


def test_gpu_plans_forces_and_restores_the_plan():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from benchmarks import gpu_plans
  from nnx_recurrent._fused import internal
  from tests.random_params import random_module

  default = internal.plan_for(nr.LSTM, 8, 512)
  layer = random_module(lambda: nr.LSTM(3, 4, rngs=nnx.Rngs(0)))  # no initializer compiles
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 3)), jnp.float32)

  def run(module):
    """The output and the input gradient, in one program traced now (a new function each
    call): the backward scan too (unrolled twice under the plan)."""
    graphdef, state = nnx.split(module)
    # (with respect to the parameters too: nnx.scan refuses constant modules under jax.grad)
    loss = lambda x, state: (nnx.merge(graphdef, state)(x) ** 2).sum()  # noqa: E731
    return jax.jit(lambda x, state: (nnx.merge(graphdef, state)(x),
                                     jax.grad(loss, argnums=(0, 1))(x, state)[0]))(x, state)

  with gpu_plans.forced('joint/4/2') as plan:
    assert internal.plan_for(nr.LSTM, 8, 512) == plan
    y, dx = run(layer)  # traced with the forced plan
  scan = internal.ScanPlan('joint', prefetch=False, unroll=4)
  assert plan == internal.Plan(scan, scan, backward_unroll=2)
  assert internal.plan_for(nr.LSTM, 8, 512) == default
  # The same function, scanned another way.
  y_generic, dx_generic = run(nr.RNN(layer.forward[0]))
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_generic), atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_generic), atol=1e-5)
  assert gpu_plans.plans(nr.GRU) == ['default', 'hoisted/1/1', 'hoisted/4/4', 'hoisted/8/8',
                                     'loop/1/1', 'loop/4/4', 'loop/8/8']
  # The Pallas kernels' size variants: set inside, restored after.
  with gpu_plans.forced('pallas/num_warps=4,chunk=32'), internal.pallas_settings() as inside:
    assert (inside.num_warps, inside.chunk) == (4, 32)
  with internal.pallas_settings() as after:
    assert after == internal.PallasSettings()


def numpy_skeleton(w_i, w_h, xs):
  """The matmul skeleton of benchmarks/bound.py, step by step in float64."""
  import numpy as np

  w_i, w_h, xs = (np.asarray(a, np.float64) for a in (w_i, w_h, xs))
  T, B, _ = xs.shape
  H = w_h.shape[0]
  h, ys, zs = np.zeros((B, H)), [], []
  for t in range(T):
    z = xs[t] @ w_i + h @ w_h
    h = z[:, :H]
    ys.append(h)
    zs.append(z)
  dh, dzs = np.zeros((B, H)), [None] * T
  for t in reversed(range(T)):
    dz = zs[t].copy()
    dz[:, :H] += dh
    dh = dz @ w_h.T
    dzs[t] = dz
  h_prev = [np.zeros((B, H))] + ys[:-1]
  dw_i = sum(xs[t].T @ dzs[t] for t in range(T))
  dw_h = sum(h_prev[t].T @ dzs[t] for t in range(T))
  return np.stack(ys), dw_i, dw_h


@pytest.mark.parametrize('family, inputs', [('lstm', 'joint'), ('lstm', 'loop'),
                                            ('lstm', 'hoisted'), ('gru', 'loop'),
                                            ('gru', 'hoisted')])
def test_bound_skeleton_does_the_training_steps_matmuls(family, inputs):
  import jax
  import numpy as np

  from benchmarks import bound

  B, T, I, H = 3, 6, 4, 5
  fwd, train = bound.skeleton(family, inputs, H)

  @jax.jit  # the arguments, the forward and the training step in one program
  def run(key):
    args = bound.skeleton_args(family, B, T, I, H, key)
    return args, fwd(*args), train(*args)

  args, got_ys, (got_i, got_h) = run(jax.random.key(0))
  assert args[1].shape == (H, bound.GATES[family] * H)
  ys, dw_i, dw_h = numpy_skeleton(*args)
  np.testing.assert_allclose(got_ys, ys, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_i, dw_i, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got_h, dw_h, rtol=1e-4, atol=1e-4)


def test_bound_rejects_an_unknown_inputs_mode():
  from benchmarks import bound

  with pytest.raises(ValueError, match=r"`inputs` must be one of \('loop', 'hoisted'\) for "
                                       r"'gru', got 'joint'"):
    bound.skeleton('gru', 'joint', 4)


def test_bound_rows_pick_the_best_skeleton_and_flag_targets_below_it():
  from benchmarks import bound

  shape = (2, 3, 4, 5)
  results = [result('nnx.RNN(OptimizedLSTMCell)', [10.0], [100.0], shape, 'flax.nnx'),
             result('nr.LSTM', [9.0], [90.0], shape),
             result('torch.nn.LSTM', [8.0], [60.0], shape, 'torch'),
             result('skeleton.LSTM[joint]', [7.0], [80.0], shape, 'skeleton'),
             result('skeleton.LSTM[loop]', [6.0], [78.0], shape, 'skeleton'),
             result('skeleton.LSTM[hoisted]', [8.5], [79.0], shape, 'skeleton')]
  (row,) = bound.bound_rows(results)  # no GRU results: no GRU row
  assert (row['skeleton_train'], row['skeleton_fwd']) == ('skeleton.LSTM[loop]',) * 2
  assert row['skeleton_train_vs_flax'] == pytest.approx(0.78)
  assert row['skeleton_train_vs_torch'] == pytest.approx(1.3)
  assert row['flax_0.75x_below_bound'] and row['torch_1.25x_below_bound']
  line = bound.bound_table([row]).splitlines()[2]
  assert line == ('| (2, 3, 4, 5) | LSTM | 100.0 / 90.0 / 60.0 / 78.0 (loop) | 0.780 **> 0.75** '
                  '| 1.300 **> 1.25** | 10.0 / 9.0 / 6.0 | 0.600 |')


def test_pallas_rows_on_a_gpu_only(monkeypatch):
  """The Pallas kernels are timed on a GPU only (interpreted on a CPU: too slow)."""
  names = [i.name for i in run._impls()]
  assert not any('pallas' in n for n in names)
  monkeypatch.setattr(run, '_on_gpu', lambda: True)
  pallas = [(i.name, i.family) for i in run._impls() if '[' in i.name and 'cudnn' not in i.name]
  assert pallas == [('nr.LSTM[pallas]', 'lstm'), ('nr.GRU[pallas]', 'gru'),
                    ('nr.LSTM[xla]', 'lstm'), ('nr.GRU[xla]', 'gru')]
  # Against the scans forced: where 'auto' picks the kernels, nr.GRU is them.
  assert {('nr.LSTM[pallas]', 'torch.nn.LSTM'), ('nr.GRU[pallas]', 'nr.GRU[xla]')} <= {
    c[:2] for c in run.COMPARISONS}
  assert not {('nr.LSTM[pallas]', 'nr.LSTM'), ('nr.GRU[pallas]', 'nr.GRU')} & {
    c[:2] for c in run.COMPARISONS}


def test_triton_resources_captures_the_kernels_triton_ir():
  """``benchmarks/triton_resources.py`` reads jax's private lowering function:
  it still hands over each kernel's Triton IR (a forward with its dots, a
  backward) for Triton's compiler, which is not installed here."""
  from benchmarks import triton_resources
  from nnx_recurrent._fused import internal

  ir = triton_resources.triton_ir('GRU', 1, 3, 16, 'float32', None, False)
  assert sorted(ir) == ['backward', 'forward']
  for kernel, text in ir.items():
    assert f'tt.func public @nr_gru_{kernel}' in text
    assert text.count('tt.dot') == 3  # h W_h: one tile per gate (backward: dh_prev's terms)
    # Triton's dot needs 16 rows and columns at least: the one batch row padded to a block of 16.
    dims = re.findall(r'tt\.dot .*: tensor<(\d+)x(\d+)x\w+> \* tensor<(\d+)x(\d+)x', text)
    assert len(dims) == 3 and min(int(d) for d in sum(dims, ())) >= 16, dims
  # Two column chunks of 16: written out, 3 gates x 2 x 2 tiles; looped over
  # the chunks (as from H = 512 on), one chunk's 3 x 2 inside a second loop.
  for unrolled, dots, loops in ((2, 12, 1), (1, 6, 2)):
    with internal.pallas_settings(chunk=16, unrolled_chunks=unrolled):
      ir = triton_resources.triton_ir('GRU', 1, 3, 32, 'float32', None, False)
    assert [(t.count('tt.dot'), t.count('scf.for')) for t in ir.values()] == [(dots, loops)] * 2
  # matmul='fma': no dot; each tile product a broadcast multiply and a sum over
  # its 16 rows of W_h: h's one batch row (no padding to 16) broadcast over W_h's columns.
  with internal.pallas_settings(matmul='fma'):
    ir = triton_resources.triton_ir('GRU', 1, 3, 16, 'float32', None, False)
  for text in ir.values():
    assert 'tt.dot' not in text and text.count('"tt.reduce"') == 3
    assert re.findall(r'tt\.broadcast .* -> tensor<(\w+)xf32>', text) == ['1x16x16'] * 3


def _gpu_sh_commands(name='gpu.sh'):
  """``benchmarks/<name>``'s commands, continuation lines joined."""
  import pathlib

  text = (pathlib.Path(__file__).parents[1] / 'benchmarks' / name).read_text()
  return [line for line in text.replace('\\\n', ' ').splitlines()
          if line.strip() and not line.lstrip().startswith('#')]


def _budget_and_limit(commands):
  """A GPU script's default budget (its ``source gpu_common.sh LOG BUDGET``)
  and the common ``limit`` function's definition."""
  import re

  budget, = [int(m) for line in commands
             for m in re.findall(r'gpu_common\.sh" \S+ (\d+)$', line)]
  limit, = [line for line in _gpu_sh_commands('gpu_common.sh') if line.startswith('limit()')]
  return budget, limit


def _limits_left(limit, *calls):
  """What ``limit`` says 50 s before the deadline for each of ``calls``, then
  5 s after it."""
  return subprocess.run(['bash', '-c', f'deadline=$(( $(date +%s) + 50 )); {limit}; '
                         + '; '.join(f'limit {c}' for c in calls)
                         + '; deadline=$(( $(date +%s) - 5 )); limit 90'],
                        capture_output=True, text=True, check=True).stdout.split()


def test_gpu_sh_selects_the_rows_it_says_and_fits_its_call(monkeypatch):
  """Its ``--impls`` regexes on a GPU's implementations: the Pallas rows beside
  the scans and PyTorch (issue 14's two small shapes), then (in the time left)
  the suite without the Pallas rows; the kernels' rebuilt residuals, float16
  weights and multiply-adds against their default at batch 1 and 8; issue 14's five steps'
  limits within a 540 s budget (a 560 s device call, leaving a session's 900 s
  room for ``gpu_grid.sh``), every step's limit cut to the budget left, which
  ends within the call; and one JSON per
  step, seven with the log: the device tool brings back 8 files."""
  import re
  import shlex

  monkeypatch.setattr(run, '_on_gpu', lambda: True)
  names = [i.name for i in run._impls()]
  runs = [shlex.split(line.split('2>&1')[0]) for line in _gpu_sh_commands()
          if 'benchmarks.run' in line]
  selected = [[n for n in names if re.search(args[args.index('--impls') + 1], n)]
              for args in runs]
  pallas_rows = ['nr.LSTM', 'nr.GRU', 'nr.LSTM[pallas]', 'nr.GRU[pallas]', 'nr.LSTM[xla]',
                 'nr.GRU[xla]', 'torch.nn.LSTM', 'torch.nn.GRU']
  assert selected == [
    pallas_rows,
    ['nr.RNN(OptimizedLSTMCell)', 'nnx.RNN(OptimizedLSTMCell)', 'nr.RNN(GRUCell)',
     'nnx.RNN(GRUCell)', 'nr.LSTM', 'nr.GRU', 'nr.LSTM[cudnn]', 'torch.nn.LSTM', 'torch.nn.GRU']]
  commands = _gpu_sh_commands()
  assert sum('timeout' in line for line in commands) == 8
  limits = [int(m) for line in commands for m in re.findall(r'\btimeout \$\(limit (\d+)\)', line)]
  assert len(limits) == 8 and sum(limits[:5]) <= 470
  budget, limit = _budget_and_limit(commands)
  assert budget <= 540
  left = _limits_left(limit, 90, 30)
  assert left[0] in ('49', '50') and left[1:] == ['30', '1']
  jsons = [m for line in commands for m in re.findall(r'--json "([^"]+)"', line)]
  assert len(jsons) == len(set(jsons)) == 7
  assert any(line.startswith('timeout $(limit 60) $PY -m benchmarks.mosaic_probe --json')
             for line in commands)
  plans, = [shlex.split(line.split('2>&1')[0]) for line in commands if 'gpu_plans' in line]
  variants = plans[plans.index('--variants') + 1:][:6]
  assert variants == [
    'pallas', 'pallas/residuals=rebuilt', 'pallas/residuals=rebuilt,recurrent_weights=float16',
    'pallas/recurrent_weights=float16'] + [
    f'pallas/matmul=fma,state_elements=32,num_warps={warps}' for warps in (2, 1)]
  shapes = [tuple(map(int, s.split('x'))) for s in plans[plans.index('--shapes') + 1].split(',')]
  assert shapes[:2] == [(1, 1000, 32, 64), (8, 500, 64, 128)]  # issue 14's, first
  from benchmarks import gpu_plans
  from nnx_recurrent._fused import internal

  for variant in variants[4:]:  # programs of one row: batch 1 and 8 not padded to 16
    with gpu_plans.forced(variant):
      assert {internal.pallas_padded_rows(b, h) for b, _, _, h in shapes} == {1, 8}
      assert internal.pallas_padded_rows(3, 64) == internal.pallas_padded_rows(3, 32) == 3


def test_gpu_grid_sh_fits_its_call_and_times_what_it_says():
  """``benchmarks/gpu_grid.sh`` (a second device call, in what ``gpu.sh`` leaves
  of a session's 900 s): its first step's limit within its budget, which ends
  before the call's; the grid of batch 1-64 x hidden 32-64, 'pallas' and its
  multiply-adds ('pallas/matmul=auto') against the scans; the float16 weights
  at hidden 128, batch 1-64; then in the time left 16-row blocks against the
  default ones at batch 32 and 64 (where they differ), each compiled in threads
  with a compile timeout inside its step."""
  import re
  import shlex

  import jax.numpy as jnp

  from nnx_recurrent._fused import _pallas, _step_math, internal

  def block(rows, hidden):  # the rows of one kernel program
    return _pallas._Layout(_step_math.LSTMMath, 1, rows, hidden, hidden, proj=False,
                           packed=False, dtype=jnp.float32).block

  commands = _gpu_sh_commands('gpu_grid.sh')
  budget, limit = _budget_and_limit(commands)
  limits = [int(m) for line in commands for m in re.findall(r'\btimeout \$\(limit (\d+)\)', line)]
  assert len(limits) == 3 and limits[0] + limits[1] + 30 <= budget <= 280  # the last: what is left
  gpu_sh_budget, _ = _budget_and_limit(_gpu_sh_commands())
  assert 30 + gpu_sh_budget + 20 + budget + 10 <= 900  # a start, both calls, their slack
  assert _limits_left(limit, 100)[0] in ('49', '50')
  lines = [line for line in commands if 'gpu_plans' in line]
  grid, half, blocks = [shlex.split(line.split('2>&1')[0]) for line in lines]
  assert half[half.index('--variants') + 1:][:2] == ['pallas', 'pallas/recurrent_weights=float16']
  assert {tuple(map(int, s.split('x')))[::3] for s in half[half.index('--shapes') + 1].split(',')} \
    == {(b, 128) for b in (1, 4, 8, 16, 32, 64)}
  for args in (blocks, grid, half):
    assert int(args[args.index('--jobs') + 1]) > 1
    assert float(args[args.index('--compile-timeout') + 1]) < 200
  assert blocks[blocks.index('--variants') + 1:][:2] == ['pallas', 'pallas/state_elements=512']
  shapes = [tuple(map(int, s.split('x'))) for s in blocks[blocks.index('--shapes') + 1].split(',')]
  assert {b for b, *_ in shapes} == {32, 64} and {h for *_, h in shapes} == {32, 64, 128}
  assert all(block(b, h) > 16 for b, _, _, h in shapes)  # the default: 32 or 64 rows a program
  with internal.pallas_settings(state_elements=512):  # the variant: 16, in 2 or 4 programs
    assert {block(b, h) for b, _, _, h in shapes} == {16}
  assert grid[grid.index('--variants') + 1:][:3] == ['pallas', 'pallas/matmul=auto', '--jobs']
  assert grid[grid.index('--shapes') + 1] == '$shapes'
  loop = [line for line in commands if line.startswith(('for', '  for', 'shapes='))]
  assert loop[:3] == ['shapes=""', 'for H in 32 64; do', '  for B in 1 4 8 16 32 64; do']
  jsons = [m for line in commands for m in re.findall(r'--json "([^"]+)"', line)]
  assert len(jsons) == len(set(jsons)) == 3


def test_suite_json_keeps_the_shapes_done_when_cut_off(monkeypatch, tmp_path):
  """``--json`` is written after each shape: a run killed by ``gpu.sh``'s
  ``timeout`` during the second shape keeps the first (it wrote nothing before)."""
  import json

  def build(B, T, I, H, key):
    return run.Runner(lambda: None, lambda: None, 0.5, None)

  monkeypatch.setattr(run, '_impls', lambda: [run.Impl('nr.LSTM', 'lstm', 'ours', build)])
  monkeypatch.setattr(run, 'measure_peak', lambda n, repeats: 100.0)
  monkeypatch.setattr(run, 'machine_info', lambda: dict(cpu='cpu', cores=1, versions={}))
  bench = run.bench_shape

  def bench_shape(shape, *args, **kwargs):
    if shape == (5, 6, 7, 8):
      raise KeyboardInterrupt  # the second shape: killed
    return bench(shape, *args, **kwargs)

  monkeypatch.setattr(run, 'bench_shape', bench_shape)
  path = tmp_path / 'out.json'
  with pytest.raises(KeyboardInterrupt):
    run.main(['--shapes', '1x2x3x4,5x6x7x8', '--rounds', '1', '--json', str(path)])
  saved = json.loads(path.read_text())
  assert saved['complete'] is False
  assert [(r['shape'], r['impl'], r['compile_s']) for r in saved['results']] == [
    ([1, 2, 3, 4], 'nr.LSTM', 0.5)]
  assert len(saved['results'][0]['fwd_samples']) == 1
  assert saved['results'][0]['peak_gflops'] == 100.0  # the peak so far, in each result
  assert not list(tmp_path.glob('*.tmp'))


def test_a_shape_where_every_implementation_fails_is_reported():
  def build(B, T, I, H, key):
    raise RuntimeError('no kernel')

  (res,) = run.bench_shape((1, 2, 3, 4), [run.Impl('nr.LSTM[pallas]', 'lstm', 'ours', build)],
                           rounds=2, min_sample_s=0.001, budget_s=1.0, log=lambda msg: None)
  assert res.error == 'RuntimeError: no kernel' and res.fwd_ms is None


def test_gpu_plans_skips_a_variant_that_fails_at_its_first_call(monkeypatch, tmp_path):
  """A kernel may compile and fail at launch (e.g. out of shared memory): that
  variant is reported and the others are timed (before, the run crashed)."""
  import json

  import jax.numpy as jnp

  from benchmarks import gpu_plans

  def build(cls, shape, plan):
    if plan == 'bad':
      def fail():
        raise RuntimeError('launch failed')

      return fail, fail
    value = jnp.full(3, 2.0 if plan == 'good' else 1.5)
    return (lambda: value), (lambda: value)

  monkeypatch.setattr(gpu_plans, 'build', build)
  monkeypatch.setattr(gpu_plans, 'plans', lambda cls, pallas: ['default', 'bad', 'good'])
  path = tmp_path / 'sweep.json'
  assert gpu_plans.main(['--shapes', '1x2x3x4', '--rounds', '1', '--calls', '1',
                         '--json', str(path)]) == 0
  rows = json.loads(path.read_text())['rows']
  assert [(r['layer'], r['plan'], r.get('error')) for r in rows] == [
    ('LSTM', 'bad', 'launch failed'), ('LSTM', 'default', None), ('LSTM', 'good', None),
    ('GRU', 'bad', 'launch failed'), ('GRU', 'default', None), ('GRU', 'good', None)]
  assert rows[2]['max_abs_diff_vs_default'] == 0.5


def _pallas_run(shape, times, kind='NVIDIA H200'):
  """A ``benchmarks.run`` JSON payload: ``times`` maps an implementation to
  its (fwd, train) ms, the same in each of three rounds."""
  results = [result(impl, [fwd] * 3, [train] * 3, shape=shape)
             for impl, (fwd, train) in times.items()]
  return dict(machine=dict(device_kind=kind), ratios=run.ratios(results))


def test_pallas_verdict_reads_the_scans_of_older_records():
  """Records before the ``[xla]`` rows compared the kernels with ``nr.LSTM``,
  which 'auto' then ran on the scans: read as the scans where no ``[xla]``
  ratio is there."""
  from benchmarks import pallas_verdict

  new = _pallas_run((1, 20, 3, 16), {'nr.LSTM[pallas]': (1.0, 2.0), 'nr.LSTM[xla]': (4.0, 4.0)})
  old = dict(new, ratios=[dict(r, theirs='nr.LSTM') for r in new['ratios']])
  for record in (new, old):
    row, = pallas_verdict.verdicts([record])
    assert (row['vs_scans']['fwd_ratio'], row['vs_scans']['train_ratio']) == (0.25, 0.5)
  assert pallas_verdict.verdicts([dict(new, ratios=[])]) == []


def test_pallas_verdict_targets_and_the_table_auto_reads(monkeypatch):
  """Issue 14's targets per batch size (PyTorch at batch 1-8, the scans from
  64 on), and ``PALLAS_FASTER``'s entries only where the kernels beat the scans
  forward and training step; the printed entries are Python that
  ``implementation='auto'`` then follows on that GPU, at that shape only."""
  from benchmarks import pallas_verdict
  from nnx_recurrent._fused import _plans

  small = _pallas_run((1, 20, 3, 16), {  # LSTM: 1.4x / 1.9x PyTorch, faster than the scans
    'nr.LSTM[pallas]': (1.9, 2.8), 'torch.nn.LSTM': (1.0, 2.0), 'nr.LSTM[xla]': (4.0, 6.0),
    'nr.GRU[pallas]': (2.1, 2.0), 'torch.nn.GRU': (1.0, 2.0), 'nr.GRU[xla]': (1.0, 6.0)})
  large = _pallas_run((256, 50, 256, 512), {  # GRU: train 1.1x the scans
    'nr.LSTM[pallas]': (1.0, 1.0), 'nr.LSTM[xla]': (1.0, 1.0), 'torch.nn.LSTM': (1.0, 1.0),
    'nr.GRU[pallas]': (0.5, 1.1), 'nr.GRU[xla]': (1.0, 1.0)})
  rows = pallas_verdict.verdicts([small, large])
  got = [(r['shape'], r['layer'], r['met'], r['faster']) for r in rows]
  assert got == [((1, 20, 3, 16), 'LSTM', True, True),
                 ((1, 20, 3, 16), 'GRU', False, False),  # fwd 2.1x PyTorch; slower fwd than scans
                 ((256, 50, 256, 512), 'LSTM', True, False),  # as fast: target met, not picked
                 ((256, 50, 256, 512), 'GRU', False, False)]
  assert '| (1, 20, 3, 16) | LSTM | 1.90 [1.90-1.90] | 1.40 [1.40-1.40] | 0.47 [0.47-0.47] |' \
    in pallas_verdict.table(rows)
  text = pallas_verdict.regions(rows, pallas_verdict.device_name([small, large]), 'abc1234')
  assert text.count('PallasRegion(') == 1 and 'train 0.47x the scans (abc1234)' in text
  namespace = dict(PallasRegion=_plans.PallasRegion)
  exec(text.replace('tuple[PallasRegion, ...]', 'tuple'), namespace)
  table = namespace['PALLAS_FASTER']
  # Up to 16 rows the kernels run one 16-row block: the same programs as at batch 1.
  assert table == (_plans.PallasRegion('LSTM', rows=(1, 16), hidden=(16, 16), device='H200'),)

  class H200:
    device_kind = 'NVIDIA H200'

  monkeypatch.setattr(_plans, 'PALLAS_FASTER', table)
  monkeypatch.setattr(_plans, 'cuda_backend', lambda: True)
  monkeypatch.setattr(_plans.jax, 'devices', lambda: [H200()])
  picks = [(layer, b, h) for layer in (nr.LSTM, nr.GRU) for b in (1, 16, 17) for h in (16, 32)
           if _plans.pallas_measured_faster(layer._math, b, h)]
  assert picks == [(nr.LSTM, 1, 16), (nr.LSTM, 16, 16)]
  with pytest.raises(ValueError, match=r"expected runs on one recorded kind of device, got "
                                       r"device kinds \['NVIDIA A100', 'NVIDIA H200'\]"):
    pallas_verdict.device_name([small, _pallas_run((8, 2, 3, 16), {}, kind='NVIDIA A100')])
  with pytest.raises(ValueError, match=r"got device kinds \[None\] .*since 2026-12-02"):
    pallas_verdict.device_name([dict(ratios=[])])  # a run from before device_kind was recorded
  with pytest.raises(ValueError, match=r"got device kinds \['NVIDIA H200', None\]"):
    pallas_verdict.device_name([small, dict(ratios=[])])  # not labelled with the other's GPU
  namespace = dict(PallasRegion=_plans.PallasRegion)
  exec(pallas_verdict.regions([], 'H200', 'x').replace('tuple[PallasRegion, ...]', 'tuple'),
       namespace)
  assert namespace['PALLAS_FASTER'] == ()


def _grid(cells, kind='NVIDIA H200'):
  """A ``gpu_plans --variants pallas`` payload: ``cells`` maps (layer, batch,
  hidden) to Pallas over the scans (fwd, train), or to an error message."""
  rows = []
  for (layer, b, h), ratios in cells.items():
    shape = [b, 300, max(16, h // 2), h]
    rows.append(dict(shape=shape, layer=layer, plan='default', fwd_ms=1.0, train_ms=1.0,
                     fwd_vs_default=1.0, train_vs_default=1.0))
    if isinstance(ratios, str):
      rows.append(dict(shape=shape, layer=layer, plan='pallas', error=ratios))
    else:
      rows.append(dict(shape=shape, layer=layer, plan='pallas', fwd_ms=ratios[0],
                       train_ms=ratios[1], fwd_vs_default=ratios[0], train_vs_default=ratios[1]))
  return dict(device_kind=kind, rows=rows)


def test_pallas_verdict_regions_from_a_grid(monkeypatch):
  """A grid's regions: per layer and hidden size, each run of consecutive
  batches faster both ways, up to the rows that run the last one's kernels but
  short of the next measured batch; an error or a tie ends a run. The printed
  entries are the table 'auto' follows."""
  from benchmarks import pallas_verdict
  from nnx_recurrent._fused import _plans

  grid = _grid({('LSTM', 1, 64): (0.4, 0.5), ('LSTM', 4, 64): (0.5, 0.6),
                ('LSTM', 8, 64): (0.6, 0.7), ('LSTM', 16, 64): (1.1, 0.9),
                ('LSTM', 32, 64): (0.9, 0.9), ('LSTM', 64, 64): 'out of shared memory',
                ('GRU', 1, 64): (0.9, 1.0), ('GRU', 4, 64): (0.5, 0.5),
                ('GRU', 33, 256): (0.8, 0.9)})
  def pasted(text):  # the printed entries, run as _plans would run them
    namespace = dict(PallasRegion=_plans.PallasRegion)
    exec(text.replace('tuple[PallasRegion, ...]', 'tuple'), namespace)
    return namespace['PALLAS_FASTER']

  def with_plan(plan, cells):  # the grid with another variant's rows
    return dict(grid, rows=grid['rows'] + [dict(r, plan=plan) for r in _grid(cells)['rows']
                                           if r['plan'] == 'pallas'])

  text = pallas_verdict.grid_regions(grid, 'abc1234')
  region = _plans.PallasRegion
  assert pasted(text) == (
    region('GRU', rows=(4, 16), hidden=(64, 64), device='H200'),
    region('GRU', rows=(33, 48), hidden=(256, 256), device='H200'),  # 16-row blocks at H = 256
    region('LSTM', rows=(1, 15), hidden=(64, 64), device='H200'),  # batch 16 was slower
    region('LSTM', rows=(32, 32), hidden=(64, 64), device='H200'))  # batch 64 failed
  assert '# T=300, I=32; batch: fwd/train x the scans 1: 0.40/0.50, 4: 0.50/0.60, 8: 0.60/0.70 ' \
    '(abc1234)' in text
  # Longer comments wrap within ruff's line length: the entries paste as printed.
  many = pallas_verdict.grid_regions(_grid({('GRU', b, 64): (0.5, 0.5) for b in (1, 2, 4, 8, 16)}),
                                     'abc1234')
  assert max(len(line) for line in many.splitlines()) <= 100
  assert '4: 0.50/0.50,\n  # 8: 0.50/0.50, 16: 0.50/0.50 (abc1234)\n' in many  # after a comma
  table = pallas_verdict.grid_table(grid)
  assert '| LSTM: batch \\ hidden | 64 | 256 |' in table
  assert '| 16 | 1.10 / 0.90 |  |' in table and '| 64 | failed |  |' in table
  assert '| 33 |  | 0.80 / 0.90 |' in table
  # --plan: another variant's rows (here the loads ahead, faster at batch 16 too).
  ahead = with_plan('pallas/prefetch=1', {('LSTM', 8, 64): (0.5, 0.5),
                                          ('LSTM', 16, 64): (0.9, 0.8)})
  assert pasted(pallas_verdict.grid_regions(ahead, 'x', 'pallas/prefetch=1')) == (
    region('LSTM', rows=(8, 16), hidden=(64, 64), device='H200'),)
  assert '| 16 | 0.90 / 0.80 |' in pallas_verdict.grid_table(ahead, 'pallas/prefetch=1')
  # A region reaches the rows of the plan's own kernels: one row a program with the
  # multiply-adds, so batch 8 is not widened to the 16 rows of the dot's blocks.
  one_row = with_plan('pallas/matmul=auto', {('LSTM', 1, 64): (0.5, 0.5),
                                             ('LSTM', 8, 64): (0.5, 0.5)})
  assert pasted(pallas_verdict.grid_regions(one_row, 'x', 'pallas/matmul=auto')) == (
    region('LSTM', rows=(1, 8), hidden=(64, 64), device='H200'),)
  assert pallas_verdict.grid_regions(_grid({('GRU', 1, 64): (1.0, 0.5)}), 'x') == \
    'PALLAS_FASTER: tuple[PallasRegion, ...] = ()  # faster nowhere'
  with pytest.raises(ValueError, match=r'expected a grid with its `device_kind`'):
    pallas_verdict.grid_regions(dict(rows=[]), 'x')


def test_pallas_verdict_edges_of_the_targets():
  """Batch 8 is judged against PyTorch (1.5x / 2x are met), batch 64 against the
  scans; 'faster' means strictly faster both ways; a region names its batch; a
  later run's shape replaces an earlier one's."""
  from benchmarks import pallas_verdict

  stale = _pallas_run((8, 5, 3, 16), {
    'nr.GRU[pallas]': (9.0, 9.0), 'nr.GRU[xla]': (1.0, 1.0), 'torch.nn.GRU': (1.0, 1.0)})
  b8 = _pallas_run((8, 5, 3, 16), {  # LSTM: exactly 2x / 1.5x PyTorch, 4x / 3x the scans
    'nr.LSTM[pallas]': (4.0, 3.0), 'torch.nn.LSTM': (2.0, 2.0), 'nr.LSTM[xla]': (1.0, 1.0),
    'nr.GRU[pallas]': (1.0, 1.0), 'torch.nn.GRU': (1.0, 1.0), 'nr.GRU[xla]': (2.0, 2.0)})
  b64 = _pallas_run((64, 5, 3, 32), {  # LSTM: 1.2x the scans and PyTorch; GRU: fwd as fast
    'nr.LSTM[pallas]': (1.2, 1.2), 'torch.nn.LSTM': (1.0, 1.0), 'nr.LSTM[xla]': (1.0, 1.0),
    'nr.GRU[pallas]': (1.0, 0.5), 'nr.GRU[xla]': (1.0, 1.0)})
  b128 = _pallas_run((128, 5, 3, 32), {  # LSTM: train as fast; GRU: no scans
    'nr.LSTM[pallas]': (0.5, 1.0), 'nr.LSTM[xla]': (1.0, 1.0),
    'nr.GRU[pallas]': (1.0, 1.0), 'torch.nn.GRU': (1.0, 1.0)})
  rows = pallas_verdict.verdicts([stale, b128, b64, b8])
  assert [(r['shape'][0], r['layer'], r['met'], r['faster']) for r in rows] == [
    (8, 'LSTM', True, False), (8, 'GRU', True, True), (64, 'LSTM', False, False),
    (64, 'GRU', True, False), (128, 'LSTM', True, False), (128, 'GRU', None, False)]
  assert 'PallasRegion(\'GRU\', rows=(8, 16), hidden=(16, 16), device=\'H200\')' in \
    pallas_verdict.regions(rows, 'H200', 'x')
  # The later run replaces the whole shape: no PyTorch ratio left over from the stale run.
  rows = pallas_verdict.verdicts([stale, _pallas_run((8, 5, 3, 16), {
    'nr.GRU[pallas]': (0.5, 0.5), 'nr.GRU[xla]': (1.0, 1.0)})])
  assert [(r['layer'], r['vs_torch'], r['met'], r['faster']) for r in rows] == [
    ('GRU', None, None, True)]


def test_pallas_verdict_refuses_runs_without_pallas_rows(tmp_path, capsys):
  """A CPU run (no Pallas rows) is not read as "faster nowhere"."""
  from benchmarks import pallas_verdict

  path = tmp_path / 'cpu.json'
  path.write_text(json.dumps(_pallas_run((2, 5, 3, 4),
                                         {'nr.LSTM[xla]': (1, 1), 'torch.nn.LSTM': (1, 1)},
                                         kind='cpu')))
  with pytest.raises(SystemExit):
    pallas_verdict.main([str(path)])
  assert f'no nr.LSTM[pallas] / nr.GRU[pallas] ratios in {path}' in capsys.readouterr().err


def test_pallas_verdict_main_prints_the_entries_and_ranking(tmp_path, capsys):
  from benchmarks import pallas_verdict

  path, sweep = tmp_path / 'pallas.json', tmp_path / 'sweep.json'
  path.write_text(json.dumps(_pallas_run((2, 5, 3, 4), {
    'nr.LSTM[pallas]': (1.0, 1.0), 'nr.LSTM[xla]': (2.0, 2.0), 'torch.nn.LSTM': (1.0, 1.0)})))
  sweep.write_text(json.dumps(dict(rows=[
    dict(shape=[2, 5, 3, 4], layer='LSTM', plan=plan, train_ms=ms)
    for plan, ms in (('pallas', 2.0), ('pallas/a=1', 1.0))])))
  assert pallas_verdict.main([str(path), '--sweep', str(sweep), '--commit', 'abc1234']) == 0
  out = capsys.readouterr().out
  assert "  # (2, 5, 3, 4): fwd 0.50x, train 0.50x the scans (abc1234)\n" \
         "  PallasRegion('LSTM', rows=(2, 16), hidden=(4, 4), device='H200'),\n" in out
  assert out.splitlines()[-2:] == [f'  {"pallas/a=1":40s} 0.500x (1 layer)',
                                   f'  {"pallas":40s} 1.000x (1 layer)']
  grid = tmp_path / 'grid.json'  # --grid: its tables and its regions instead of the runs'
  cells = _grid({('GRU', 4, 64): (0.5, 0.25)})
  cells['rows'] += [dict(r, plan='pallas/prefetch=1', fwd_vs_default=2.0)
                    for r in cells['rows'] if r['plan'] == 'pallas']
  grid.write_text(json.dumps(cells))
  assert pallas_verdict.main([str(path), '--grid', str(grid), '--commit', 'c']) == 0
  out = capsys.readouterr().out
  assert '| (2, 5, 3, 4) | LSTM |' in out and '| 4 | 0.50 / 0.25 |' in out
  assert 'pallas/prefetch=1 over the scans' in out and '| 4 | 2.00 / 0.25 |' in out
  assert "PallasRegion('GRU', rows=(4, 16), hidden=(64, 64), device='H200')" in out
  assert 'PallasRegion(\'LSTM\'' not in out
  assert pallas_verdict.main(['--grid', str(grid), '--plan', 'pallas/prefetch=1']) == 0
  assert 'faster nowhere' in capsys.readouterr().out  # its forward was 2x the scans
  with pytest.raises(SystemExit):
    pallas_verdict.main([])
  assert 'expected benchmarks.run JSON files, --grid, or both' in capsys.readouterr().err


def test_pallas_verdict_ranks_the_size_variants():
  """The geometric mean of each variant's training step over the default
  settings', over the layers where both ran; a failed variant is left out."""
  from benchmarks import pallas_verdict

  def row(layer, plan, train_ms, **extra):
    return dict(shape=[8, 500, 64, 128], layer=layer, plan=plan, train_ms=train_ms, **extra)

  sweep = dict(rows=[row('LSTM', 'default', 9.0), row('LSTM', 'pallas', 10.0),
                     row('LSTM', 'pallas/a=1', 5.0), row('LSTM', 'pallas/b=1', 8.0),
                     row('GRU', 'pallas', 10.0), row('GRU', 'pallas/a=1', 30.0),
                     row('GRU', 'pallas/b=1', None, error='out of shared memory'),
                     dict(row('GRU', 'pallas', None, error='failed'), shape=[1, 2, 3, 4]),
                     dict(row('GRU', 'pallas/a=1', 1.0), shape=[1, 2, 3, 4])])
  assert pallas_verdict.sweep_ranking(sweep) == [
    ('pallas/b=1', pytest.approx(0.8), 1), ('pallas', 1.0, 2),
    ('pallas/a=1', pytest.approx(1.5 ** 0.5), 2)]


def test_pallas_verdict_sets_each_variant_against_pytorch(tmp_path, capsys):
  """``--sweep`` with runs: each variant at batch 1-8 over PyTorch's medians at
  its shape (issue 14's target: train 1.5x, fwd 2x); failed variants, larger
  batches and shapes PyTorch did not run are left out."""
  from benchmarks import pallas_verdict

  def torch_row(shape, layer, fwd, train, **extra):
    return dict(shape=list(shape), impl=f'torch.nn.{layer}', fwd_ms=fwd, train_ms=train, **extra)

  small, large = (1, 1000, 32, 64), (64, 100, 128, 256)
  runs = [dict(results=[torch_row(small, 'LSTM', 1.0, 2.0), torch_row(large, 'LSTM', 1.0, 1.0),
                        torch_row(small, 'GRU', 9.0, 9.0, error='boom'),
                        dict(torch_row(small, 'LSTM', 5.0, 5.0), impl='nr.LSTM')])]

  def row(shape, layer, plan, fwd, train, **extra):
    return dict(shape=list(shape), layer=layer, plan=plan, fwd_ms=fwd, train_ms=train, **extra)

  sweep = dict(rows=[row(small, 'LSTM', 'pallas', 3.0, 6.0),
                     row(small, 'LSTM', 'pallas/matmul=fma', 1.5, 2.8),
                     row(small, 'LSTM', 'pallas/x=1', None, None, error='failed'),
                     row(small, 'GRU', 'pallas', 1.0, 1.0),  # PyTorch's GRU failed there
                     row(large, 'LSTM', 'pallas', 0.5, 0.5)])
  assert pallas_verdict.sweep_vs_torch(sweep, runs).splitlines()[2:] == [
    '| (1, 1000, 32, 64) | LSTM | pallas | 3.00 | 6.00 | 3.00 | 3.00 | no |',
    '| (1, 1000, 32, 64) | LSTM | pallas/matmul=fma | 1.50 | 2.80 | 1.50 | 1.40 | yes |']
  assert pallas_verdict.sweep_vs_torch(sweep, []) == ''
  path, sweep_path = tmp_path / 'run.json', tmp_path / 'sweep.json'
  path.write_text(json.dumps(dict(_pallas_run(small, {
    'nr.LSTM[pallas]': (3.0, 6.0), 'torch.nn.LSTM': (1.0, 2.0)}), results=runs[0]['results'])))
  sweep_path.write_text(json.dumps(sweep))
  assert pallas_verdict.main([str(path), '--sweep', str(sweep_path)]) == 0
  out = capsys.readouterr().out
  assert "Each variant against PyTorch (the runs' medians at the same shape)" in out
  assert out.rstrip().endswith('| pallas/matmul=fma | 1.50 | 2.80 | 1.50 | 1.40 | yes |')


# -- the runner's bookkeeping under a fake clock (mutation audit) ---------------------------
class FakeClock:
  """``time.perf_counter`` for ``benchmarks.run``: only the fake runners move it."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  """A ``FakeClock`` in place of ``benchmarks.run``'s ``time.perf_counter``."""
  fake = FakeClock()
  monkeypatch.setattr(run, 'time', types.SimpleNamespace(perf_counter=fake))
  return fake


def fake_impl(clock, name, fwd_s, train_s, calls, compile_s=None, temp_mb=None, library='ours'):
  """An ``Impl`` whose calls take ``fwd_s`` / ``train_s`` (iterables of seconds) on ``clock``
  and append ``(name, kind)`` to ``calls``."""
  fwd_s, train_s = iter(fwd_s), iter(train_s)

  def step(kind, durations):
    def call():
      calls.append((name, kind))
      clock.now += next(durations)
    return call

  def build(B, T, I, H, key):
    return run.Runner(step('fwd', fwd_s), step('train', train_s), compile_s, temp_mb)

  return run.Impl(name, 'lstm', library, build)


def test_bench_shape_rounds_rotate_and_report_medians(clock):
  """One call per sample (no warm-up call), at least 3 rounds whatever the budget, each
  round starting one implementation later; medians, GFLOP/s, compile time and memory."""
  import itertools

  calls, logged = [], []
  # Two warm-up calls each, then one per round (seconds): medians 2 ms / 30 ms and 4 / 40 ms.
  a = fake_impl(clock, 'a', [1, 1, 0.001, 0.005, 0.002], [1, 1, 0.030, 0.010, 0.090], calls,
                compile_s=0.5, temp_mb=0.0)
  b = fake_impl(clock, 'b', [1, 1, 0.004, 0.004, 0.004], [1, 1, 0.040, 0.040, 0.040], calls,
                compile_s=1.25, library='torch')

  def broken(B, T, I, H, key):
    raise ValueError('bad shape')

  shape = (1000, 100, 3, 4)
  got = run.bench_shape(shape, [a, run.Impl('c', 'gru', 'ours', broken), b], rounds=5,
                        min_sample_s=1e-9, budget_s=0.0, log=logged.append)
  assert logged == ['  c: FAILED ValueError: bad shape', '  (3 rounds)']
  warm = [('a', 'fwd'), ('a', 'fwd'), ('a', 'train'), ('a', 'train'),
          ('b', 'fwd'), ('b', 'fwd'), ('b', 'train'), ('b', 'train')]
  a_round, b_round = [('a', 'fwd'), ('a', 'train')], [('b', 'fwd'), ('b', 'train')]
  assert calls == warm + list(itertools.chain(a_round, b_round, b_round, a_round,
                                              a_round, b_round))
  ra, rc, rb = got
  assert (rc.impl, rc.error, rc.fwd_ms, rc.fwd_samples) == ('c', 'ValueError: bad shape', None, [])
  assert ra.fwd_samples == pytest.approx([1.0, 5.0, 2.0])
  assert ra.train_samples == pytest.approx([30.0, 10.0, 90.0])
  assert (ra.fwd_ms, ra.train_ms) == pytest.approx((2.0, 30.0))
  assert (rb.fwd_ms, rb.train_ms) == pytest.approx((4.0, 40.0))
  assert (ra.compile_s, ra.temp_mb, rb.compile_s, rb.temp_mb) == (0.5, 0.0, 1.25, None)
  # LSTM (1000, 100, 3, 4): forward 2 * 1e5 * 4 * 4 * (3 + 4) = 22.4e6 FLOPs, training
  # 2 * 1e5 * 4 * 4 * (6 + 12) = 57.6e6.
  assert (ra.gflops_fwd, ra.gflops_train) == pytest.approx((11.2, 1.92))
  assert (rb.gflops_fwd, rb.gflops_train) == pytest.approx((5.6, 1.44))
  # The results table: % of the peak, compile s and temp MB (0.0 is a value, None is n/a).
  lines = run.results_table(got, peak=40.0).splitlines()
  assert lines[2:] == [
    '| (1000, 100, 3, 4) | a | 2.00 | 30.00 | 11.2 (28%) | 1.9 (5%) | 0.50 | 0.0 |',
    '| (1000, 100, 3, 4) | c | failed: ValueError: bad shape ||||||',
    '| (1000, 100, 3, 4) | b | 4.00 | 40.00 | 5.6 (14%) | 1.4 (4%) | 1.25 | n/a |']


def test_bench_shape_calls_per_sample_from_the_slower_warm_up(clock):
  """Calls per sample: ``ceil(min_sample_s / t)``, ``t`` the slower of the two warm-up
  calls; a sample of several calls starts with one untimed call and is their mean."""
  calls = []
  # fwd: warm-ups 7 ms and 4 ms -> ceil(30 / 7) = 5 calls; train: 11 ms -> ceil(30 / 11) = 3.
  impl = fake_impl(clock, 'a', [0.007] + [0.004] * 20, [0.011] * 20, calls)
  (res,) = run.bench_shape((1, 2, 3, 4), [impl], rounds=1, min_sample_s=0.03, budget_s=100.0,
                           log=lambda msg: None)
  assert calls.count(('a', 'fwd')) == 2 + 1 + 5 and calls.count(('a', 'train')) == 2 + 1 + 3
  assert res.fwd_samples == pytest.approx([4.0]) and res.train_samples == pytest.approx([11.0])


def test_jax_runner_records_compile_time_and_temp_memory(monkeypatch, clock):
  class Compiled:
    def __init__(self, fn, mem):
      self.fn, self.mem = fn, mem

    def __call__(self, *args):
      return self.fn(*args)

    def memory_analysis(self):
      return self.mem

  def fake_jax(mem):
    def jit(fn):
      def lower(*args):
        clock.now += 1.5  # compiling takes 1.5 s per function
        return types.SimpleNamespace(compile=lambda: Compiled(fn, mem))
      return types.SimpleNamespace(lower=lower)
    return types.SimpleNamespace(jit=jit)

  monkeypatch.setattr(run, 'jax', fake_jax(types.SimpleNamespace(temp_size_in_bytes=3 * 2**19)))
  runner = run._jax_runner(lambda a, b: a + b, lambda a, b: a * b, (3, 4))
  assert (runner.fwd(), runner.train(), runner.compile_s, runner.temp_mb) == (7, 12, 3.0, 1.5)
  monkeypatch.setattr(run, 'jax', fake_jax(None))
  assert run._jax_runner(lambda a: a, lambda a: a, (1,)).temp_mb is None


def test_measure_peak_is_the_best_of_the_repeats(monkeypatch):
  times = iter([0.5, 0.25, 1.0])
  monkeypatch.setattr(run, '_sample', lambda fn, number: next(times))
  assert run.measure_peak(2, 3) == pytest.approx(2 * 2**3 / 0.25 / 1e9)


def test_ratios_skip_failed_results_and_meet_a_target_at_equality():
  ours = result('nr.GRU', [3.0], [3.0])
  theirs = result('nnx.RNN(GRUCell)', [3.0], [4.0], library='flax.nnx')
  failed = run.Result((2, 3, 4, 5), 'torch.nn.GRU', 'gru', 'torch', error='RuntimeError: x')
  rows = run.ratios([ours, theirs, failed])
  assert [(r['theirs'], r['fwd_ratio'], r['fwd_met'], r['train_met']) for r in rows] == [
    ('nnx.RNN(GRUCell)', 1.0, True, True)]  # fwd 1.0 <= 1.0, train 0.75 <= 0.75


def test_summary_of_a_train_only_target_met_at_equality():
  row = dict(shape=[1, 2, 3, 4], ours='nr.GRU', theirs='torch.nn.GRU', fwd_ratio=2.0,
             train_ratio=1.25, fwd_target=None, train_target=1.25)
  lines = run.summary_table([[row]]).splitlines()
  assert lines[2:] == [
    '| (1, 2, 3, 4) | nr.GRU / torch.nn.GRU | train | 1.25 | 1.25 | 1.25 | 1/1 |']


def test_readme_table_has_a_row_per_shape():
  results = [dict(shape=[1, 2, 3, 4], impl='nr.GRU', train_ms=1.0),
             dict(shape=[5, 6, 7, 8], impl='nr.GRU', train_ms=2.0)]
  assert run.readme_table(results).splitlines()[2:] == [
    '| (1, 2, 3, 4) | n/a | n/a | n/a | n/a | n/a | n/a | 1.0 | n/a |',
    '| (5, 6, 7, 8) | n/a | n/a | n/a | n/a | n/a | n/a | 2.0 | n/a |']


def test_parse_shapes():
  import argparse

  assert run._parse_shapes('8X500x64x128,1x2x3x4') == ((8, 500, 64, 128), (1, 2, 3, 4))
  with pytest.raises(argparse.ArgumentTypeError, match=r"expected BxTxIxH items, got '1x2x3'"):
    run._parse_shapes('1x2x3x4,1x2x3')
  with pytest.raises(argparse.ArgumentTypeError, match=r"got '1x2x3x4x5'"):
    run._parse_shapes('1x2x3x4x5')


def test_main_selects_times_and_writes_json_and_markdown(monkeypatch, tmp_path, capsys, clock):
  """``main`` end to end on fake implementations and a fake clock: ``--impls`` is a search,
  7 rounds by default, the larger of the two peaks, a busy machine flagged (load above
  1.25 x the cores), the final JSON complete; ``--summarize`` reads every file."""
  import os

  impls = [fake_impl(clock, 'nr.LSTM', [0.1] * 9, [0.2] * 9, [], compile_s=1.0),  # one call
           fake_impl(clock, 'torch.nn.LSTM', [0.05] * 9, [0.25] * 9, [], library='torch'),
           fake_impl(clock, 'nr.GRU', [], [], [])]  # not selected: never called
  monkeypatch.setattr(run, '_impls', lambda: impls)
  peaks = iter([100.0, 80.0])
  monkeypatch.setattr(run, 'measure_peak', lambda n, repeats: next(peaks))
  monkeypatch.setattr(run, 'machine_info', lambda: dict(
    cpu='Fake CPU', cores=2, jax_devices=['cpu:0'], xla_flags='', versions=dict(
      python='3', jax='j', jaxlib='jl', flax='f', numpy='n', torch='t')))
  monkeypatch.setattr(os, 'getloadavg', lambda: (2.6, 1.0, 0.5))
  monkeypatch.setattr(os, 'cpu_count', lambda: 2)
  path, md = tmp_path / 'out.json', tmp_path / 'out.md'
  assert run.main(['--shapes', '1x2x3x4', '--impls', 'LSTM', '--json', str(path),
                   '--markdown', str(md)]) == 0
  saved = json.loads(path.read_text())
  assert (saved['complete'], saved['busy'], saved['peak_gflops']) == (True, True, 100.0)
  assert [(r['impl'], len(r['fwd_samples']), r['peak_gflops']) for r in saved['results']] == [
    ('nr.LSTM', 7, 100.0), ('torch.nn.LSTM', 7, 100.0)]
  assert [r['fwd_ms'] for r in saved['results']] == pytest.approx([100.0, 50.0])
  (row,) = saved['ratios']
  assert (row['fwd_ratio'], row['train_ratio']) == pytest.approx((2.0, 0.8))
  assert row['train_met'] is True
  text = md.read_text()
  assert 'Load average (1 min): start 2.60, per shape 1x2x3x4: 2.60, end 2.60. **Busy machine: ' \
         'timings unreliable.**' in text
  assert '| (1, 2, 3, 4) | nr.LSTM / torch.nn.LSTM | 2.00 [2.00-2.00] | 0.80 [0.80-0.80] ' \
         '(<= 1.25 met) |' in text
  capsys.readouterr()
  # Several runs summarised: each run's ratio.
  other = tmp_path / 'other.json'
  other.write_text(json.dumps(dict(ratios=[dict(row, train_ratio=1.5)])))
  assert run.main(['--summarize', str(path), str(other)]) == 0
  assert capsys.readouterr().out.splitlines()[2] == (
    '| (1, 2, 3, 4) | nr.LSTM / torch.nn.LSTM | train | 1.25 | 0.80, 1.50 | 1.15 | 1/2 |')


def test_main_is_not_busy_at_the_load_limit(monkeypatch, tmp_path, clock):
  import os

  monkeypatch.setattr(run, '_impls', lambda: [fake_impl(clock, 'nr.LSTM', [0.05] * 5,
                                                        [0.05] * 5, [])])
  monkeypatch.setattr(run, 'measure_peak', lambda n, repeats: 100.0)
  monkeypatch.setattr(run, 'machine_info', lambda: dict(cpu='cpu', cores=2, versions={}))
  monkeypatch.setattr(os, 'getloadavg', lambda: (2.5, 1.0, 0.5))  # 1.25 x 2 cores: not more
  monkeypatch.setattr(os, 'cpu_count', lambda: 2)
  path = tmp_path / 'out.json'
  assert run.main(['--quick', '--json', str(path)]) == 0
  saved = json.loads(path.read_text())
  assert saved['busy'] is False and len(saved['results'][0]['fwd_samples']) == 3


def test_main_reports_from_json_files_without_measuring(monkeypatch, tmp_path, capsys):
  """``--readme-table`` and ``--summarize`` read every row of their files and measure
  nothing."""
  monkeypatch.setattr(run, '_impls', lambda: pytest.fail('measured'))
  monkeypatch.setattr(run, 'measure_peak', lambda n, repeats: pytest.fail('measured'))
  path = tmp_path / 'run.json'

  def row(ours, theirs):
    return dict(shape=[1, 2, 3, 4], ours=ours, theirs=theirs, fwd_ratio=0.5, train_ratio=0.5,
                fwd_target=1.0, train_target=None)

  path.write_text(json.dumps(dict(
    results=[dict(shape=[1, 2, 3, 4], impl='nr.GRU', train_ms=2.0, fwd_ms=1.0)],
    ratios=[row('nr.GRU', 'nnx.RNN(GRUCell)'), row('nr.LSTM', 'nnx.RNN(OptimizedLSTMCell)')])))
  assert run.main(['--readme-table', str(path)]) == 0
  table = capsys.readouterr().out
  assert '| (1, 2, 3, 4) | n/a | n/a | n/a | n/a | n/a | n/a | 2.0 | n/a |' in table
  assert run.main(['--summarize', str(path), str(path)]) == 0
  assert [line.split(' | ')[1] for line in capsys.readouterr().out.splitlines()[2:]] == [
    'nr.GRU / nnx.RNN(GRUCell)', 'nr.LSTM / nnx.RNN(OptimizedLSTMCell)']



def test_median_ms_warms_up_then_takes_the_median_of_sample_means(monkeypatch):
  """``benchmarks.median_ms`` (the probes' and the step profile's timer): one
  call to warm up, untimed; then each sample is ``n`` calls' mean, and the
  median of the samples is returned, whatever a slow sample took."""
  import types

  import benchmarks

  fake = FakeClock()
  monkeypatch.setattr(benchmarks, 'time', types.SimpleNamespace(perf_counter=fake))
  seconds = iter([9.0, 0.001, 0.003, 0.002, 0.002, 0.5, 0.5])  # warm-up, then 3 x 2 calls
  calls = []

  def fn(*args):
    calls.append(args)
    fake.now += next(seconds)
    return args

  assert benchmarks.median_ms(fn, 'x', rounds=3, n=2) == pytest.approx(2.0)  # (2, 2, 500)
  assert calls == [('x',)] * 7


def test_programs_compares_hlo_without_source_locations_and_names(tmp_path, capsys):
  from benchmarks import programs
  module = ('HloModule m\n\nFileNames\n1 "/tree/a.py"\n\nStackFrames\n1 {file_location_id=1}\n\n'
            '%fused.3 (p: f32[2]) -> f32[2] {\n  %p = f32[2] parameter(0)\n'
            '  ROOT %tanh.7 = f32[2] tanh(%p), metadata={op_name="jit(f)/tanh" '
            'source_file="/tree/a.py" source_line=3}, stack_frame_id=1\n}\n')
  moved = module.replace('/tree/', '/other/').replace('source_line=3', 'source_line=9')
  assert programs.normalize_hlo(module) == programs.normalize_hlo(moved)
  assert 'tree' not in programs.normalize_hlo(module)
  assert 'tanh(%p)' in programs.normalize_hlo(module)
  renamed = programs.normalize_hlo(module).replace('%tanh.7', '%tanh.9')
  assert renamed != programs.normalize_hlo(module)
  assert programs.canonical_names(renamed) == programs.canonical_names(
    programs.normalize_hlo(module))
  # Two dumps of one tree compare equal; a renamed value reads '~', another op 'X'.
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  for out in (a, b):
    summary = programs.dump(out, ((2, 3, 4, 5),), match=r'^nr\.GRU@.*@seq_lengths@fwd$',
                            log=lambda _: None)
  (name,) = summary
  assert name == 'nr.GRU@2x3x4x5@seq_lengths@fwd' and summary[name]['temp_bytes'] >= 0
  assert programs.compare(a, b) == [(name, '===')]
  hlo = tmp_path / 'b' / f'{name}.hlo'
  text = hlo.read_text()
  value = re.search(r'%([\w.\-]+) = ', text).group(1)  # the first value defined
  hlo.write_text(re.sub(rf'%{re.escape(value)}(?![\w.\-])', f'%{value}_renamed', text))
  assert programs.compare(a, b) == [(name, '==~')]
  hlo.write_text(text.replace(' tanh(', ' logistic(', 1))
  assert programs.compare(a, b) == [(name, '==X')]
  assert programs.main(['--compare', a, b]) == 1
  assert f'==X  {name}' in capsys.readouterr().out
