"""The GPU scripts' logic on the CPU, with fakes in place of the GPU (mutation audit).

``benchmarks/cudnn_check.py``, ``cudnn_diag.py``, ``gpu_plans.py`` and
``triton_resources.py`` run for real only on a lent GPU, once: what they measure,
what they write to JSON and their error paths are checked here against fake
clocks, fake devices and hand-computed values. No timing.
"""

import contextlib
import functools
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import rnn

import nnx_recurrent as nr
from benchmarks import cudnn_check, cudnn_diag, gpu_plans, triton_resources
from nnx_recurrent._fused import internal
from tests.test_benchmarks import FakeClock


@pytest.fixture
def clock(monkeypatch):
  """A ``FakeClock`` in place of the scripts' ``time.perf_counter``."""
  fake = FakeClock()
  for module in (cudnn_check, cudnn_diag, gpu_plans):
    monkeypatch.setattr(module, 'time', types.SimpleNamespace(perf_counter=fake))
  return fake


def ticking(clock, seconds, calls=None):
  """A function whose successive calls take ``seconds`` (an iterable) on ``clock``."""
  seconds = iter(seconds)

  def fn(*args):
    if calls is not None:
      calls.append(args)
    clock.now += next(seconds)
  return fn


# -- benchmarks/cudnn_check.py ---------------------------------------------------------------
def test_cudnn_check_relative_errors():
  a, b = np.array([3.0, 4.0]), np.array([0.0, 8.0])
  assert cudnn_check.rel(a, b) == pytest.approx(5.0 / 8.0)  # |(3, -4)| / |(0, 8)|
  got = dict(u=np.array([1.0, 0.0]), v=np.array([3.0]))
  want = dict(u=np.array([2.0, 0.0]), v=np.array([4.0]))
  assert cudnn_check.tree_rel(got, want) == pytest.approx(0.5)  # the worse leaf: 1/2 over 1/4


def test_cudnn_check_median_ms_warms_up_then_takes_the_median(clock):
  calls = []
  fn = ticking(clock, [9.0, 0.001, 0.002, 0.006], calls)  # first: the warm-up (compile)
  assert cudnn_check.median_ms(fn, 'p', 'x', repeats=3) == pytest.approx(2.0)
  assert calls == [('p', 'x')] * 4


def test_cudnn_check_step_fns_against_float64():
  """The forward with ``seq_lengths`` (0 and T included) against the float64 NumPy
  LSTM, and the training step's loss ``mean(y ** 2)`` with its gradients."""
  layer = nr.LSTM(2, 3, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 2)), jnp.float32)
  lengths = jnp.array([4, 0, 2], jnp.int32)
  params, fwd, train = cudnn_check.step_fns(layer)
  y64 = cudnn_check.numpy_lstm(layer, x, np.asarray(lengths))
  assert y64.shape == (3, 4, 3) and not y64[1].any() and not y64[2, 2:].any()
  np.testing.assert_allclose(fwd(params, x, lengths), y64, rtol=1e-5, atol=1e-6)
  loss, grads = train(params, x, lengths)
  assert float(loss) == pytest.approx(np.mean(y64 ** 2), rel=1e-5)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)


def test_cudnn_check_accuracy_rows(monkeypatch):
  """Both precisions, the scans then cuDNN; |y - y64| / |y64| per row, and each row's
  gradients against the first's (the scans at 'highest'), under the row's precision."""
  B, T, I, H = 3, 4, 2, 5
  y64 = np.arange(1.0, 1.0 + B * T * H).reshape(B, T, H)
  # (y error, gradient) of each row, in the order measured.
  want = {('xla', 'highest'): (0.0, [1.0, 0.0]), ('cudnn', 'highest'): (0.5, [1.0, 0.5]),
          ('xla', None): (0.25, [1.0, 0.25]), ('cudnn', None): (2.0, [0.0, 0.0])}
  seen = []

  def step_fns(layer):
    impl = layer.implementation

    def fwd(params, x, lengths):
      precision = jax.config.jax_default_matmul_precision
      seen.append((impl, precision, x.shape, np.asarray(lengths).tolist()))
      return y64 * (1 + want[impl, precision][0])

    def train(params, x, lengths):
      return 0.0, dict(w=np.array(want[impl, jax.config.jax_default_matmul_precision][1]))
    return 'params', fwd, train

  lengths64 = []
  monkeypatch.setattr(cudnn_check, 'step_fns', step_fns)
  monkeypatch.setattr(cudnn_check, 'numpy_lstm',
                      lambda layer, x, lengths: lengths64.append(lengths.tolist()) or y64)
  rows = cudnn_check.accuracy((B, T, I, H), log=lambda msg: None)
  order = [('xla', 'highest'), ('cudnn', 'highest'), ('xla', None), ('cudnn', None)]
  assert [(impl, precision) for impl, precision, *_ in seen] == order
  lengths = seen[0][3]
  assert all(s[2:] == ((B, T, I), lengths) for s in seen) and lengths64 == [lengths] * 4
  assert lengths[0] == T and lengths[1] == 0  # a full and an empty row
  assert [(r['impl'], r['precision'], r['shape']) for r in rows] == [
    ('xla', 'highest', (B, T, I, H)), ('cudnn', 'highest', (B, T, I, H)),
    ('xla', 'default', (B, T, I, H)), ('cudnn', 'default', (B, T, I, H))]
  assert [r['y_rel_err_vs_float64'] for r in rows] == pytest.approx([0.0, 0.5, 0.25, 2.0])
  # |g - (1, 0)| / |(1, 0)|
  assert [r['grad_rel_diff_vs_xla_highest'] for r in rows] == pytest.approx([0.0, 0.5, 0.25, 1.0])


def test_cudnn_check_timings_row(monkeypatch):
  """cuDNN and the scans, each at the layer asked for, forward and training step on
  full lengths; the row names each median."""
  ms = {('cudnn', 'fwd'): 1.0, ('cudnn', 'train'): 2.0, ('xla', 'fwd'): 3.0,
        ('xla', 'train'): 8.0}
  layers, timed, logged = [], [], []

  def step_fns(layer):
    layers.append((layer.implementation, layer.num_layers, layer.bidirectional))
    return 'params', (layer.implementation, 'fwd'), (layer.implementation, 'train')

  def median_ms(fn, params, x, lengths):
    timed.append((fn, x.shape, np.asarray(lengths).tolist()))
    return ms[fn]

  monkeypatch.setattr(cudnn_check, 'step_fns', step_fns)
  monkeypatch.setattr(cudnn_check, 'median_ms', median_ms)
  row = cudnn_check.timings((2, 3, 4, 5), 2, True, logged.append)
  assert sorted(layers) == [('cudnn', 2, True), ('xla', 2, True)]
  assert sorted(timed) == [(k, (2, 3, 4), [3, 3]) for k in sorted(ms)]
  assert row == dict(shape=(2, 3, 4, 5), num_layers=2, bidirectional=True, cudnn_fwd_ms=1.0,
                     cudnn_train_ms=2.0, xla_fwd_ms=3.0, xla_train_ms=8.0)
  assert logged[0].endswith('train ratio cudnn/xla 0.250')


def test_cudnn_check_json_keeps_each_part_when_cut_off(monkeypatch, tmp_path):
  """The JSON after each accuracy shape and each timing: a run killed in the middle
  keeps what it measured, ``complete`` only at the end."""
  monkeypatch.setattr(cudnn_check, 'ACCURACY_SHAPES', ((1, 1, 1, 1), (2, 2, 2, 2)))
  monkeypatch.setattr(cudnn_check, 'TIMINGS', (((3, 3, 3, 3), 1, False), ((4, 4, 4, 4), 2, True)))
  path = tmp_path / 'check.json'
  args = types.SimpleNamespace(json=str(path), dry=True)

  def run(stop=None):
    def stopping(shape):
      if shape == stop:
        raise KeyboardInterrupt  # gpu.sh's timeout

    def accuracy(shape, log):
      stopping(shape)
      return [dict(acc=shape[0])]

    def timings(shape, num_layers, bidirectional, log):
      stopping(shape)
      return dict(time=shape[0])

    monkeypatch.setattr(cudnn_check, 'accuracy', accuracy)
    monkeypatch.setattr(cudnn_check, 'timings', timings)
    with contextlib.suppress(KeyboardInterrupt):
      assert cudnn_check._check(args, log=lambda msg='': None) == 0
    saved = json.loads(path.read_text())
    return saved['complete'], saved['accuracy'], saved['timings']

  assert run(stop=(2, 2, 2, 2)) == (False, [dict(acc=1)], [])
  assert run(stop=(4, 4, 4, 4)) == (False, [dict(acc=1), dict(acc=2)], [dict(time=3)])
  assert run() == (True, [dict(acc=1), dict(acc=2)], [dict(time=3), dict(time=4)])
  assert json.loads(path.read_text())['devices'] == [str(d) for d in jax.devices()]


def test_cudnn_check_needs_a_gpu_or_dry(monkeypatch, capsys):
  """On the CPU it refuses (exit 1) unless ``--dry``, where the cuDNN layer runs
  ``lstm_ref`` and so matches the float64 LSTM."""
  monkeypatch.setattr(cudnn_check, '_check', lambda args, log: pytest.fail('measured'))
  assert cudnn_check.main(['--json', 'x.json']) == 1
  assert "no CUDA GPU (default backend 'cpu'); use --dry" in capsys.readouterr().out

  def check(args, log):
    assert args.json == 'x.json'
    layer = nr.LSTM(2, 3, implementation='cudnn', rngs=nnx.Rngs(0))
    x, lengths = jnp.ones((2, 3, 2)), jnp.array([3, 1], jnp.int32)
    params, fwd, _ = cudnn_check.step_fns(layer)
    y = fwd(params, x, lengths)
    np.testing.assert_allclose(y, cudnn_check.numpy_lstm(layer, x, np.asarray(lengths)),
                               rtol=1e-5, atol=1e-6)
    return 0

  monkeypatch.setattr(cudnn_check, '_check', check)
  assert cudnn_check.main(['--dry', '--json', 'x.json']) == 0


# -- benchmarks/cudnn_diag.py ----------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(8, 9, 10, 11, 12))  # as lstm_ref: one program
def toy_ref(x, h0, c0, W_ih, W_hh, b_ih, b_hh, lengths, input_size, hidden_size, num_layers,
            dropout, bidirectional):
  """Not an LSTM: a cheap stand-in for ``lstm_ref`` (same arguments, same output
  shapes), a function of x, h0, c0 and W_ih, zero past each row's length."""
  valid = (jnp.arange(x.shape[1])[None] < lengths[:, None])[..., None]
  y = jnp.concatenate([jnp.tanh(x @ W_ih[d].T[:, :hidden_size] + h0[d][:, None])
                       for d in range(len(h0))], axis=-1) * valid
  h_n = h0 * c0 + jnp.stack(jnp.split(y[:, -1], len(h0), axis=-1))
  return y, h_n, c0 + h0 ** 2


@functools.partial(jax.jit, static_argnames=('input_size', 'hidden_size', 'num_layers',
                                             'dropout', 'bidirectional', 'nudged'))
def toy_lstm(x, h0, c0, w, lengths, *, input_size, hidden_size, num_layers, dropout,
             bidirectional, nudged=False):
  """``toy_ref`` with ``jax.experimental.rnn.lstm``'s signature (cuDNN's stand-in);
  ``nudged``: one element of ``y`` off by -1, one of ``h_n`` by +0.5."""
  y, h_n, c_n = toy_ref(x, h0, c0, *rnn.unpack_lstm_weights(w, input_size, hidden_size,
                                                            num_layers, bidirectional),
                        lengths, input_size, hidden_size, num_layers, dropout, bidirectional)
  if nudged:
    y, h_n = y.at[0, 0, 0].add(-1.0), h_n.at[0, 0, 0].add(0.5)
  return y, h_n, c_n


def test_cudnn_diag_against_reference(monkeypatch):
  """The reference against itself but for one element of ``y`` and one of ``h_n``:
  those two entries at their size, either sign, and nothing in the gradients (the
  same lengths, cotangents and directions on both sides)."""
  lengths = [5, 3, 1]
  seen = []

  def lstm(x, h0, c0, w, seq_lengths, **kw):
    seen.append((h0.shape, np.asarray(seq_lengths).tolist(), kw['bidirectional']))
    return toy_lstm(x, h0, c0, w, seq_lengths, nudged=True, **kw)

  monkeypatch.setattr(cudnn_diag.rnn, 'lstm_ref', toy_ref)
  monkeypatch.setattr(cudnn_diag.rnn, 'lstm', lstm)
  err = cudnn_diag.against_reference(lengths, True)
  assert err == pytest.approx([1.0, 0.5, 0, 0, 0, 0, 0], abs=1e-6)
  assert seen == [((2, 3, 4), lengths, True)]  # two directions, 3 rows, H = 4


def test_cudnn_diag_transposed_input_applies_each_fix(monkeypatch):
  """Each entry runs its own fix; the layout fix asks for row-major (0, 1, 2).
  (A fake constraint doubles its input, so only its entry shows an error.)"""
  monkeypatch.setattr(cudnn_diag.rnn, 'lstm_ref', toy_ref)
  monkeypatch.setattr(cudnn_diag.rnn, 'lstm', toy_lstm)
  layouts = []

  def doubling(x, layout):
    layouts.append(layout.major_to_minor)
    return 2 * x

  monkeypatch.setattr(cudnn_diag, 'with_layout_constraint', doubling)
  err = cudnn_diag.transposed_input()
  assert list(err) == ['plain transpose', 'reshape round trip', 'optimization_barrier',
                       'with_layout_constraint']
  assert [err[k] for k in list(err)[:3]] == pytest.approx([0.0] * 3, abs=1e-6)
  assert layouts == [(0, 1, 2)]
  # The same problem computed here: max |y(2 x) - y(x)|, lengths (5, 1, 3, 2).
  x, h0, c0, w = cudnn_diag._problem(4, 5, 3, 4, False)
  lengths = jnp.array([5, 1, 3, 2], jnp.int32)
  kw = dict(input_size=3, hidden_size=4, num_layers=1, dropout=0.0, bidirectional=False)
  want = jnp.abs(toy_lstm(2 * x, h0, c0, w, lengths, **kw)[0]
                 - toy_lstm(x, h0, c0, w, lengths, **kw)[0]).max()
  assert err['with_layout_constraint'] == pytest.approx(float(want), rel=1e-5)
  assert float(want) > 0.01


def test_cudnn_diag_median_ms(clock):
  calls = []
  assert cudnn_diag._median_ms(ticking(clock, [7.0, 0.004, 0.001, 0.002], calls), n=3) == \
    pytest.approx(2.0)
  assert len(calls) == 4


def test_cudnn_diag_raw_forward_waits_for_both_devices(monkeypatch, clock):
  """Each sample ends when the device is done: jax's ``block_until_ready``, torch's
  ``cuda.synchronize`` (a fake torch, whose GPU work finishes at the synchronize),
  torch reading the (B, T, I) input batch-first."""
  B, T, I, H = 2, 3, 4, 5
  monkeypatch.setattr(cudnn_diag.rnn, 'lstm', toy_lstm)
  blocked = []

  def block_until_ready(x):
    blocked.append(x)
    clock.now += 0.003
    return x

  monkeypatch.setattr(jax, 'block_until_ready', block_until_ready)
  read = []

  class LSTM:
    def __init__(self, input_size, hidden_size, batch_first=False):
      self.sizes, self.batch_first = (input_size, hidden_size), batch_first

    def cuda(self):
      return self

    def __call__(self, x):
      b, t = x.shape[:2] if self.batch_first else x.shape[1::-1]
      read.append((self.sizes, b, t, x.device))

  torch = types.SimpleNamespace(
    nn=types.SimpleNamespace(LSTM=LSTM), no_grad=contextlib.nullcontext,
    randn=lambda *shape, device: types.SimpleNamespace(shape=shape, device=device),
    cuda=types.SimpleNamespace(synchronize=ticking(clock, [0.005] * 21)))
  monkeypatch.setitem(sys.modules, 'torch', torch)
  assert cudnn_diag.raw_forward_ms(B, T, I, H) == pytest.approx((3.0, 5.0))
  assert read == [((I, H), B, T, 'cuda')] * 21
  assert len(blocked) == 21 and blocked[0][0].shape == (B, T, H)  # (y, h_n, c_n)


def test_cudnn_diag_main_prints_each_check(monkeypatch, capsys):
  """Both directions at five sets of lengths and the layout fixes in full float32,
  then the raw forward at three shapes; each number under its own label."""
  seen = []

  def against_reference(lengths, bi):
    seen.append(('ref', jax.config.jax_default_matmul_precision, bi, tuple(lengths)))
    return [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]

  def transposed_input():
    seen.append(('transposed', jax.config.jax_default_matmul_precision))
    return {'fix': 0.25}

  monkeypatch.setattr(cudnn_diag, 'against_reference', against_reference)
  monkeypatch.setattr(cudnn_diag, 'transposed_input', transposed_input)
  monkeypatch.setattr(cudnn_diag, 'raw_forward_ms', lambda *shape: (shape[0] + 0.5, 2.0))
  cudnn_diag.main()
  lines = capsys.readouterr().out.splitlines()
  assert [s[:3] for s in seen[:10]] == [('ref', 'highest', bi) for bi in (False, True)
                                        for _ in range(5)]
  assert seen[10:] == [('transposed', 'highest')]
  lengths = [s[3] for s in seen[:5]]
  assert [s[3] for s in seen[5:10]] == lengths and len(set(lengths)) == 5
  assert lines[0].endswith('y 1.0e-01 h_n 2.0e-01 c_n 3.0e-01 dw 4.0e-01 dx 5.0e-01 '
                           'dh_0 6.0e-01 dc_0 7.0e-01')
  assert lines[10] == 'jit, transposed input, fix: max|y - ref| 2.5e-01'
  assert lines[11:] == [f'raw forward {s}: jax.experimental.rnn.lstm {s[0] + 0.5:.3f} ms, '
                        'torch.nn.LSTM 2.000 ms' for s in ((1, 1000, 32, 64), (8, 500, 64, 128),
                                                           (64, 100, 128, 256))]


# -- benchmarks/gpu_plans.py -----------------------------------------------------------------
def test_gpu_plans_lists_and_default_plans():
  assert gpu_plans.plans(nr.LSTM) == [
    'default', 'hoisted/1/1', 'hoisted/4/4', 'hoisted/8/8', 'loop/1/1', 'loop/4/4', 'loop/8/8',
    'joint/1/1', 'joint/4/4', 'joint/8/8']
  pallas = gpu_plans.plans(nr.GRU, pallas=True)
  assert pallas[:2] == ['default', 'pallas'] and pallas[2:] == list(gpu_plans.PALLAS_VARIANTS[1:])
  default = internal.plan_for(nr.LSTM, 8, 512)
  with gpu_plans.forced('default') as plan:
    assert plan is None and internal.plan_for(nr.LSTM, 8, 512) == default
  with gpu_plans.forced('pallas') as plan, internal.pallas_settings() as inside:
    assert plan is None and inside == internal.PallasSettings()
  with gpu_plans.forced('pallas/matmul=fma,state_elements=32'), \
       internal.pallas_settings() as inside:
    assert inside == internal.PallasSettings()._replace(matmul='fma', state_elements=32)
    assert internal.pallas_padded_rows(3, 64) == 3  # programs of one row


class Probe(nnx.Module):
  """A layer that records how it is built and what is forced while it is traced."""

  log: list = []

  def __init__(self, inputs, hidden, *, implementation, rngs):
    self.log.append(implementation)
    self.w = nnx.Param(jnp.arange(inputs * hidden, dtype=jnp.float32).reshape(inputs, hidden) / 10)

  def __call__(self, x):
    with internal.pallas_settings() as settings:
      self.log.append((internal.plan_for(nr.LSTM, 8, 512), settings.num_warps))
    return x @ self.w


def test_gpu_plans_build_compiles_under_the_plan(monkeypatch):
  monkeypatch.setattr(Probe, 'log', [])
  default_plan = internal.plan_for(nr.LSTM, 8, 512)
  warps = internal.PallasSettings().num_warps
  f, t = gpu_plans.build(Probe, (2, 3, 4, 5), 'loop/4/2')
  scan = internal.ScanPlan('loop', prefetch=False, unroll=4)
  plan = internal.Plan(scan, scan, backward_unroll=2)
  assert Probe.log == ['xla', (plan, warps), (plan, warps)]  # the forward, the training step
  y = np.asarray(f())
  loss, grads = t()
  assert y.shape == (2, 3, 5) and float(loss) == pytest.approx(np.mean(y ** 2), rel=1e-6)
  assert [g.shape for g in jax.tree_util.tree_leaves(grads)] == [(4, 5)]
  monkeypatch.setattr(Probe, 'log', [])
  gpu_plans.build(Probe, (2, 3, 4, 5), 'pallas/num_warps=2')
  assert Probe.log == ['pallas', (default_plan, 2), (default_plan, 2)]


def test_gpu_plans_sample_ms_is_the_mean_after_a_warm_up(clock):
  calls = []
  assert gpu_plans.sample_ms(ticking(clock, [5.0, 0.001, 0.002, 0.006], calls), 3) == \
    pytest.approx(3.0)
  assert len(calls) == 4


def fake_variants(monkeypatch, outputs, samples, broken=(), stop=None):
  """``gpu_plans.build`` and ``sample_ms`` faked: plan ``p``'s forward returns
  ``outputs[p]`` and its training step ``'train'``; each sample of ``(p, 'fwd' or 'train')``
  is the next of ``samples[p, kind]``; a plan in ``broken`` fails in its training
  step; building the layer ``stop`` is interrupted. Returns the sample calls, in order."""
  samples = {k: iter(v) for k, v in samples.items()}
  calls = []

  def build(cls, shape, plan):
    if cls.__name__ == stop:
      raise KeyboardInterrupt  # gpu.sh's timeout
    if outputs.get(plan) is None:
      raise RuntimeError(f'{plan} does not compile')

    def f():
      return jnp.asarray(outputs[plan])

    def t():
      if plan in broken:
        raise RuntimeError(f'{plan} failed at launch')
      return jnp.full(len(outputs[plan]), 100.0)

    f.key, t.key = (plan, 'fwd'), (plan, 'train')
    return f, t

  def sample_ms(fn, n):
    fn()
    calls.append((fn.key, n))
    return next(samples[fn.key])

  monkeypatch.setattr(gpu_plans, 'build', build)
  monkeypatch.setattr(gpu_plans, 'sample_ms', sample_ms)
  return calls


def test_gpu_plans_jobs_compile_every_variant_before_timing(monkeypatch, tmp_path, capsys):
  """``--jobs``: every variant of every shape is lowered in turn and compiled in
  threads before the first sample (no compile competes with the timing); a
  variant that fails to lower, or is still compiling after
  ``--compile-timeout``, is reported and the others are timed; ``--variants``
  replaces the plan lists, beside 'default'; the JSON records the device kind."""
  import threading

  events, release = [], threading.Event()

  def lower(cls, shape, plan):
    if plan == 'unlowerable':
      raise RuntimeError('no lowering')
    events.append(('lower', cls.__name__, plan))

    def compile_both():
      if plan == 'slow':
        release.wait(30)  # still compiling when the timeout passes
      events.append(('compile', cls.__name__, plan))
      value = jnp.full(2, 1.0 if plan == 'default' else 1.5)
      return (lambda: value), (lambda: value)

    return compile_both

  def sample_ms(fn, n):
    events.append('sample')
    fn()
    return 2.0

  monkeypatch.setattr(gpu_plans, 'lower', lower)
  monkeypatch.setattr(gpu_plans, 'sample_ms', sample_ms)
  path = tmp_path / 'grid.json'
  try:
    assert gpu_plans.main(['--shapes', '1x2x3x4', '--variants', 'pallas', 'unlowerable', 'slow',
                           '--jobs', '3', '--compile-timeout', '0.5', '--rounds', '1',
                           '--json', str(path)]) == 0
  finally:
    release.set()
  first_sample = events.index('sample')
  assert sorted(e for e in events[:first_sample]) == sorted(
    [(step, layer, plan) for step in ('lower', 'compile') for layer in ('LSTM', 'GRU')
     for plan in ('default', 'pallas')] + [('lower', 'LSTM', 'slow'), ('lower', 'GRU', 'slow')])
  record = json.loads(path.read_text())
  assert record['device_kind'] == jax.devices()[0].device_kind
  assert [(r['layer'], r['plan'], r.get('error'), r.get('max_abs_diff_vs_default'))
          for r in record['rows']] == [
    (layer, plan, error, diff) for layer in ('LSTM', 'GRU') for plan, error, diff in (
      ('unlowerable', 'no lowering', None), ('slow', 'not compiled within 0.5 s', None),
      ('default', None, 0.0), ('pallas', None, 0.5))]
  assert 'lowered and compiled 4 of 8 variants in' in capsys.readouterr().out


def test_gpu_plans_main_rotates_and_compares_medians(monkeypatch, tmp_path, capsys):
  """Rounds rotate the plans; medians of the samples (5 calls each by default), ratios
  to the default's, ``max |y - y_default|``; the best per layer from the plans that ran."""
  pallas = []
  monkeypatch.setattr(gpu_plans, 'plans',
                      lambda cls, pallas_: pallas.append(pallas_) or ['default', 'a', 'b', 'bad'])
  per_layer = {('default', 'fwd'): [1.0, 2.0, 6.0], ('default', 'train'): [10.0, 10.0, 40.0],
               ('a', 'fwd'): [3.0, 4.0, 8.0], ('a', 'train'): [5.0, 5.0, 50.0],
               ('b', 'fwd'): [1.0, 1.0, 1.0], ('b', 'train'): [20.0, 20.0, 20.0]}
  calls = fake_variants(monkeypatch, dict(default=[1.0, 1.0, 1.0], a=[1.0, 0.5, 1.0],
                                          b=[1.0, 1.0, 1.25], bad=[1.0, 1.0, 1.0]),
                        {k: v * 4 for k, v in per_layer.items()}, broken=('bad',))
  path = tmp_path / 'sweep.json'
  assert gpu_plans.main(['--pallas', '--shapes', '1x2x3x4,5x6x7x8', '--rounds', '3',
                         '--json', str(path)]) == 0
  assert pallas == [True] * 4
  plans = ['default', 'a', 'b']
  rotation = plans + plans[1:] + plans[:1] + plans[2:] + plans[:2]
  assert calls == [((p, kind), 5) for _ in range(4) for p in rotation for kind in ('fwd', 'train')]
  rows = json.loads(path.read_text())['rows']
  assert [(r['shape'], r['layer'], r['plan']) for r in rows] == [
    (shape, layer, plan) for shape in ([1, 2, 3, 4], [5, 6, 7, 8]) for layer in ('LSTM', 'GRU')
    for plan in ('bad', *plans)]
  assert rows[0]['error'] == 'bad failed at launch'
  got = [[r[k] for r in rows[1:4]] for k in ('fwd_ms', 'train_ms', 'fwd_vs_default',
                                              'train_vs_default', 'max_abs_diff_vs_default')]
  assert got == [[2.0, 4.0, 1.0], [10.0, 5.0, 20.0], [1.0, 2.0, 0.5], [1.0, 0.5, 2.0],
                 [0.0, 0.5, 0.25]]  # exact: medians of given samples, powers of two
  assert rows[4:8] == [dict(r, layer='GRU') for r in rows[:4]]

  out = capsys.readouterr().out.splitlines()
  assert out[-4:] == [f'{shape} {layer:4}: b 0.50x | a 0.50x' for shape in ((1, 2, 3, 4),
                                                                            (5, 6, 7, 8))
                      for layer in ('LSTM', 'GRU')]


def test_gpu_plans_json_keeps_each_layer_when_cut_off(monkeypatch, tmp_path, capsys):
  """Written after each layer, the one whose default failed too (nothing timed there):
  a run killed during the next layer keeps it."""
  monkeypatch.setattr(gpu_plans, 'plans', lambda cls, pallas: ['default', 'a'])
  path = tmp_path / 'sweep.json'
  samples = {(p, k): [1.0] * 3 for p in ('default', 'a') for k in ('fwd', 'train')}
  for outputs, want in ((dict(a=[1.0]), [('default', 'default does not compile')]),
                        (dict(default=[1.0], a=[1.0]), [('default', None), ('a', None)])):
    fake_variants(monkeypatch, outputs, samples, stop='GRU')
    with pytest.raises(KeyboardInterrupt):
      gpu_plans.main(['--shapes', '1x2x3x4', '--json', str(path)])
    rows = json.loads(path.read_text())['rows']
    assert [(r['layer'], r['plan'], r.get('error')) for r in rows] == [
      ('LSTM', plan, error) for plan, error in want]
  fake_variants(monkeypatch, dict(a=[1.0]), samples)
  assert gpu_plans.main(['--shapes', '1x2x3x4']) == 0
  assert capsys.readouterr().out.splitlines()[-2:] == ['(1, 2, 3, 4) LSTM: none ran',
                                                       '(1, 2, 3, 4) GRU : none ran']


# -- benchmarks/triton_resources.py ----------------------------------------------------------
def test_triton_resources_parses_its_arguments():
  assert triton_resources.parse_shapes('1x2x3,4x5x6') == [
    (cls, b, i, h, 'float32', None, False) for b, i, h in ((1, 2, 3), (4, 5, 6))
    for cls in ('LSTM', 'GRU')]
  assert triton_resources.parse_settings('') == {}
  assert triton_resources.parse_settings('chunk=32,num_warps=4') == dict(chunk=32, num_warps=4)
  assert triton_resources.parse_settings('matmul=fma,hold_bytes=0') == dict(matmul='fma',
                                                                           hold_bytes=0)
  assert triton_resources.case_name('LSTM', 8, 64, 128, 'bfloat16', 64, True) == \
    'LSTM_B8_I64_H128_bfloat16_proj64_packed'
  assert triton_resources.case_name('GRU', 1, 2, 3, 'float32', None, False) == \
    'GRU_B1_I2_H3_float32'


def test_triton_compile_counts_one_pass_of_the_longest_loop():
  """The compiler child's per-step counts: the PTX's longest loop (the kernels'
  time loop, a loop inside it counted once), instructions only (no labels,
  directives, comments), the barriers, shared loads and stores, ``ldmatrix``, global
  loads and ``mma`` in it."""
  from benchmarks import _triton_compile

  ptx = """
  .reg .b32 %r<9>;
  ld.global.b32 %r1, [%rd1];
  bar.sync 0;
$L__BB0_1:                      // =>This Inner Loop Header: Depth=1
  ld.shared.b32 %r2, [%r1];     // a comment: bar.sync
  ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r5, %r6, %r7, %r8}, [%r1];
  ld.global.v4.b32 {%r5, %r6, %r7, %r8}, [%rd2];
  mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};
$L__BB0_2:
  st.shared.b32 [%r1], %r2;
  bar.sync 0;
  @%p1 bra $L__BB0_2;
  ld.shared.v2.b32 {%r3, %r4}, [%r1];
  barrier.sync 0;
  @%p2 bra $L__BB0_1;
  ret;
"""
  assert _triton_compile.loop_stats(ptx) == dict(instructions=10, barriers=2, shared_loads=2,
                                                 shared_stores=1, ldmatrix=1, global_loads=1,
                                                 mma=1)
  assert _triton_compile.loop_stats('  ld.global.b32 %r1, [%rd1];\n  ret;') is None


def fake_compiler(monkeypatch, shared):
  """``triton_kernels`` (the LSTM's in 2 warps, the GRU's in 1) and the compiler
  child faked: the child answers for each file
  ``shared[i]`` bytes of shared memory (``None``: a compiler error), after a line of
  noise. Returns its calls: (argv, the files' texts, Triton's cache directory)."""
  monkeypatch.setattr(triton_resources, 'triton_kernels', lambda *case: (
    dict(forward=f'fwd {case}', backward=f'bwd {case}'), 2 if case[0] == 'LSTM' else 1))
  shared, calls = iter(shared), []

  def run(argv, capture_output, text, env):
    files = argv[4:]
    texts = []
    for path in files:
      with open(path) as f:
        texts.append(f.read())
    calls.append((argv, texts, env['TRITON_CACHE_DIR'], os.path.dirname(files[0])))
    lines = ['Triton says hello']
    for path in files:
      size = next(shared)
      row = (dict(ok=True, shared=size, registers=40, spill_bytes=0) if size is not None
             else dict(ok=False, error='PTXASError: out of registers'))
      lines.append(json.dumps(dict(file=os.path.basename(path), seconds=1.5, **row)))
    return types.SimpleNamespace(stdout='\n'.join(lines) + '\n', stderr='', returncode=0)

  monkeypatch.setattr(triton_resources, 'subprocess', types.SimpleNamespace(run=run))
  return calls


def test_triton_resources_main_reports_each_kernel(monkeypatch, tmp_path, capsys):
  """Per case, the forward and backward IR in two files for one child (the Python
  given, the kernels' own warps and the settings' stages, a fresh Triton cache);
  227 KiB exactly fits, a byte more does not, a compiler error does not; exit 1 then."""
  limit = 227 * 1024
  calls = fake_compiler(monkeypatch, [limit, limit + 1, None, 1024])
  path = tmp_path / 'res.json'
  assert triton_resources.main(['--triton-python', '/opt/triton/python', '--shapes', '1x2x3',
                                '--settings', 'num_warps=2,num_stages=3', '--json',
                                str(path)]) == 1
  cases = [(cls, 1, 2, 3, 'float32', None, False) for cls in ('LSTM', 'GRU')]
  assert [c[0][:4] for c in calls] == [
    ['/opt/triton/python', os.path.join(os.path.dirname(os.path.abspath(
      triton_resources.__file__)), '_triton_compile.py'), warps, '3'] for warps in '21']
  assert [c[1] for c in calls] == [[f'fwd {case}', f'bwd {case}'] for case in cases]
  assert all(c[2] == os.path.join(c[3], 'cache') for c in calls)
  saved = json.loads(path.read_text())
  assert (saved['settings']['num_warps'], saved['settings']['num_stages']) == (2, 3)
  assert saved['shared_limit'] == 232448
  assert [(r['kernel'], r['fits'], r['num_warps']) for r in saved['kernels']] == [
    ('LSTM_B1_I2_H3_float32_forward', True, 2), ('LSTM_B1_I2_H3_float32_backward', False, 2),
    ('GRU_B1_I2_H3_float32_forward', False, 1), ('GRU_B1_I2_H3_float32_backward', True, 1)]
  assert saved['kernels'][2]['error'] == 'PTXASError: out of registers'
  out = capsys.readouterr().out
  assert 'LSTM_B1_I2_H3_float32_backward' in out and 'OVER THE 227 KiB LIMIT' in out
  assert 'GRU_B1_I2_H3_float32_forward' + ' ' * 24 + ' FAILED: PTXASError' in out
  fake_compiler(monkeypatch, [limit] * 4)  # everything fits
  assert triton_resources.main(['--shapes', '1x2x3']) == 0
  dump = tmp_path / 'dump'  # --dump: the IR files (and the child's) kept there, not the cache
  calls = fake_compiler(monkeypatch, [limit] * 4)
  assert triton_resources.main(['--shapes', '1x2x3', '--dump', str(dump)]) == 0
  assert {c[3] for c in calls} == {str(dump)}
  assert not any(c[2].startswith(str(dump)) for c in calls)
  assert sorted(os.listdir(dump)) == sorted(f'{cls}_B1_I2_H3_float32_{kernel}.ttir'
                                            for cls in ('LSTM', 'GRU')
                                            for kernel in ('forward', 'backward'))


def test_triton_resources_main_reports_a_failed_child(monkeypatch):
  monkeypatch.setattr(triton_resources, 'triton_kernels',
                      lambda *case: (dict(forward='f', backward='b'), 8))
  monkeypatch.setattr(triton_resources, 'subprocess', types.SimpleNamespace(
    run=lambda *a, **kw: types.SimpleNamespace(stdout='', stderr='ModuleNotFoundError: triton',
                                               returncode=1)))
  with pytest.raises(RuntimeError, match='the Triton compiler child failed:\nModuleNotFoundError'):
    triton_resources.main(['--shapes', '1x2x3'])


def test_triton_resources_a_child_that_dies_fails_the_rest(monkeypatch, tmp_path):
  """The child prints a line per file as it compiles; one killed on a file (an LLVM
  ERROR aborts the process) leaves that file and the next without a line: they are
  failed kernels, not missing ones (before: left out, and the run exit 0)."""
  monkeypatch.setattr(triton_resources, 'triton_kernels',
                      lambda *case: (dict(forward='f', backward='b'), 8))

  def run(argv, **kwargs):
    first = json.dumps(dict(file=os.path.basename(argv[4]), ok=True, shared=1024, registers=40,
                            spill_bytes=0, seconds=1.0))
    return types.SimpleNamespace(stdout=first + '\n', returncode=-6,
                                 stderr='a warning\nLLVM ERROR: Failed to compute parent layout\n')

  monkeypatch.setattr(triton_resources, 'subprocess', types.SimpleNamespace(run=run))
  path = tmp_path / 'res.json'
  assert triton_resources.main(['--shapes', '1x2x3', '--json', str(path)]) == 1
  error = ('no result: the compiler child exited with -6: '
           'LLVM ERROR: Failed to compute parent layout')
  assert [(r['kernel'], r['ok'], r['fits'], r.get('error')) for r in
          json.loads(path.read_text())['kernels']] == [
    (f'{cls}_B1_I2_H3_float32_{kernel}', kernel == 'forward', kernel == 'forward',
     None if kernel == 'forward' else error) for cls in ('LSTM', 'GRU')
    for kernel in ('forward', 'backward')]


def test_triton_resources_ir_follows_the_case(monkeypatch):
  """A projection adds a dot to each kernel, bfloat16 shows in the IR, packed sequences
  change it; the private lowering function is restored after; a lowering that
  captured no kernel is an error."""
  from jax._src.pallas.triton import pallas_call_registration as registration

  lower = registration.lowering.lower_jaxpr_to_triton_module
  plain = triton_resources.triton_ir('LSTM', 1, 3, 16, 'float32', None, False)
  assert registration.lowering.lower_jaxpr_to_triton_module is lower
  proj = triton_resources.triton_ir('LSTM', 1, 3, 16, 'bfloat16', 8, False)
  packed = triton_resources.triton_ir('LSTM', 1, 3, 16, 'bfloat16', 8, True)
  for kernel in ('forward', 'backward'):
    assert proj[kernel].count('tt.dot') == plain[kernel].count('tt.dot') + 1
    assert 'bf16' in proj[kernel] and 'bf16' not in plain[kernel]
    assert packed[kernel] != proj[kernel]
  monkeypatch.setattr(triton_resources, 'export', types.SimpleNamespace(
    DisabledSafetyCheck=triton_resources.export.DisabledSafetyCheck,
    export=lambda *a, **kw: lambda *args: None))
  with pytest.raises(RuntimeError, match='expected a forward and a backward kernel, captured 0'):
    triton_resources.triton_ir('GRU', 1, 3, 16, 'float32', None, False)


def test_triton_resources_compiles_with_the_kernels_own_warps():
  """The warps each kernel is compiled with are those its exported call launches
  with: the ``num_warps`` setting for the ``dot``, ``matmul='auto'``'s own (1 up
  to 32 columns, 2 up to 64) whatever the setting (before, the setting's 8 for
  all: the 'auto' kernels' static counts were of 8 warps)."""
  def warps(hidden, **settings):
    with internal.pallas_settings(**settings):
      return triton_resources.triton_kernels('LSTM', 1, 3, hidden, 'float32', None, False)[1]

  assert warps(16) == 8 and warps(16, num_warps=4) == 4
  assert warps(16, matmul='auto', num_warps=4) == 1
  assert warps(64, matmul='auto') == 2
  assert warps(128, matmul='auto', num_warps=4) == 4  # the dot beyond 64


# -- benchmarks/gpu.sh's calls ---------------------------------------------------------------
def test_gpu_sh_arguments_reach_the_gpu_scripts(monkeypatch, tmp_path):
  """``gpu.sh``'s own command lines for ``mosaic_probe``, ``multiblock_probe``,
  ``step_profile`` and ``cudnn_check``, parsed by the scripts: the Mosaic probe at its
  shapes (a toy one here, on the CPU, where its kernel does not compile: the row
  records the error and times the layer, interpreted); every multi-block variant
  (timing faked); the profile of both layers' kernels and PyTorch at issue 14's two
  small shapes, with the residuals rebuilt at both, the multiply-adds at the first
  and the float16 weights at the second (``PLAN@SHAPE``), PyTorch's last (profiling
  faked); and the cuDNN check on a
  CUDA GPU (faked below its argument parsing), each writing its JSON."""
  import shlex

  from tests.test_benchmarks import _gpu_sh_commands

  def argv(module):
    (line,) = [c for c in _gpu_sh_commands() if f'-m benchmarks.{module} ' in c]
    args = shlex.split(line.split('2>&1')[0].replace('"$out/', f'"{tmp_path}/'))
    return args[args.index(f'benchmarks.{module}') + 1:]

  from benchmarks import mosaic_probe

  monkeypatch.setattr(mosaic_probe, 'SHAPES', ((2, 3, 4, 64),))
  assert mosaic_probe.main(argv('mosaic_probe') + ['--rounds', '1']) == 0
  row, = json.loads((tmp_path / 'mosaic_probe.json').read_text())['rows']
  assert row['shape'] == [2, 3, 4, 64] and row['layer'] == 'nr.LSTM[pallas]'
  assert 'probe_error' in row and 'probe_ms' not in row and row['layer_ms'] > 0

  from benchmarks import multiblock_probe, step_profile

  timed = []
  monkeypatch.setattr(multiblock_probe, 'timed', lambda v: timed.append(v) or dict(
    variant=v.name, us_per_step=1.0, late=[0], max_abs_err=0.0))
  assert multiblock_probe.main(argv('multiblock_probe')) == 0
  assert timed == list(multiblock_probe.VARIANTS)
  saved = json.loads((tmp_path / 'multiblock_probe.json').read_text())
  assert [r['variant'] for r in saved['rows']] == [v.name for v in multiblock_probe.VARIANTS]

  profiled = []
  monkeypatch.setattr(step_profile, 'rows_for', lambda label, shape, *_: profiled.append(
    (label, shape)) or [])
  compiled = []
  monkeypatch.setattr(gpu_plans, 'compile_ahead', lambda tasks, jobs, timeout: compiled.append(
    (tasks, jobs, timeout)) or {})
  monkeypatch.setattr(step_profile, '_jax_pair', lambda *_: None)
  monkeypatch.setattr(step_profile, '_torch_pair', lambda *_: None)
  monkeypatch.setattr(step_profile, '_torch_cuda', lambda: False)  # no torch needed
  assert step_profile.main(argv('step_profile')) == 0
  small, large = (1, 1000, 32, 64), (8, 500, 64, 128)
  assert profiled == [((layer, variant), shape) for shape, third in (
    (small, 'pallas/matmul=auto'), (large, 'pallas/recurrent_weights=float16'))
                      for layer in ('LSTM', 'GRU')
                      for variant in ('pallas', 'pallas/residuals=rebuilt', third)] + [
    ((layer, 'torch'), shape) for shape in (small, large) for layer in ('LSTM', 'GRU')]
  assert json.loads((tmp_path / 'step_profile.json').read_text())['rows'] == []
  (tasks, jobs, timeout), = compiled  # every JAX variant compiled first, in threads
  assert [(cls.__name__, variant, shape) for cls, shape, variant in tasks] == [
    (layer, variant, shape) for (layer, variant), shape in profiled[:12]]
  assert jobs > 1 and timeout < 70

  monkeypatch.setattr(internal, 'cuda_backend', lambda: True)
  seen = []
  monkeypatch.setattr(cudnn_check, '_check', lambda args, log: seen.append(args) or 0)
  assert cudnn_check.main(argv('cudnn_check')) == 0
  assert [(a.json, a.dry) for a in seen] == [(f'{tmp_path}/cudnn_check.json', False)]


def test_triton_compile_child_reports_each_file(monkeypatch, tmp_path, capsys):
  """``benchmarks/_triton_compile.py`` on a fake ``triton``: each file compiled for
  Hopper (sm_90a) with the warps and stages given, its PTX through ``ptxas -v``
  and kept with its Triton GPU IR beside the file; one
  JSON line a file, a compiler error's lines summarised and its reproducer kept off
  stdout (where the parent reads every line starting with '{')."""
  from benchmarks import _triton_compile

  bin_dir = tmp_path / 'triton' / 'backends' / 'nvidia' / 'bin'
  bin_dir.mkdir(parents=True)
  (bin_dir / 'ptxas').write_text('')
  compiled, ptxas = [], []

  def compile(path, target, options):
    compiled.append((os.path.basename(path), target, options))
    if path.endswith('bad.ttir'):
      print('{ the reproducer: module {')
      raise RuntimeError('PassManager::run failed\nk.ttir:3:5: error: failed to legalize\n'
                         'note: see current operation\nerror: out of resource: shared memory\n'
                         'error: a third')
    return types.SimpleNamespace(asm=dict(ptx=f'ptx of {os.path.basename(path)}',
                                          ttgir=f'ttgir of {os.path.basename(path)}'),
                                 metadata=types.SimpleNamespace(shared=4096))

  def run(argv, capture_output, text):
    with open(argv[3]) as f:
      ptxas.append((argv[:3], f.read(), argv[4:]))
    return types.SimpleNamespace(stderr=(
      "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
      'ptxas info    : Function properties for k\n'
      '    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n'
      'ptxas info    : Used 168 registers, used 1 barriers, 4096 bytes smem'))

  triton = types.ModuleType('triton')
  triton.__file__, triton.compile = str(tmp_path / 'triton' / '__init__.py'), compile
  compiler = types.ModuleType('triton.backends.compiler')
  compiler.GPUTarget = lambda *target: target
  for name, module in (('triton', triton), ('triton.backends', types.ModuleType('backends')),
                       ('triton.backends.compiler', compiler)):
    monkeypatch.setitem(sys.modules, name, module)
  monkeypatch.setattr(_triton_compile, 'subprocess', types.SimpleNamespace(run=run))
  files = [str(tmp_path / f'{name}.ttir') for name in ('k_forward', 'bad')]
  _triton_compile.main(['4', '2', *files])
  assert compiled == [(os.path.basename(f), ('cuda', 90, 32), dict(num_warps=4, num_stages=2))
                      for f in files]
  assert ptxas == [([str(bin_dir / 'ptxas'), '-arch=sm_90a', '-v'], 'ptx of k_forward.ttir',
                    ['-o', os.devnull])]
  # Kept beside the IR (triton_resources --dump): the form after Triton's layout passes.
  assert (tmp_path / 'k_forward.ttgir').read_text() == 'ttgir of k_forward.ttir'
  assert not (tmp_path / 'bad.ttgir').exists()
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [{k: v for k, v in r.items() if k != 'seconds'} for r in rows] == [
    dict(file='k_forward.ttir', ok=True, shared=4096, registers=168, spill_bytes=24,
         loop=None),  # this PTX has no loop
    dict(file='bad.ttir', ok=False, error='RuntimeError: k.ttir:3:5: error: failed to legalize'
                                          ' | error: out of resource: shared memory')]
  assert all(isinstance(r['seconds'], float) for r in rows)


def test_gpu_plans_bidirectional_times_bidirectional_layers(tmp_path, monkeypatch):
  """``--bidirectional``: the layers timed are bidirectional (both directions'
  features in the outputs, the forward half the one-directional layer's), the
  Pallas kernels' outputs equal to the scans'; rows marked. (That the kernels
  run both directions in one launch: ``tests/test_pallas.py``.) The GRU's
  Pallas forward checked is the one ``main`` built and timed (kept as ``build``
  returned it, not built a second time)."""
  built = {}

  def build(cls, shape, plan, **options):
    built[cls, shape, plan, tuple(sorted(options.items()))] = fns = real_build(
      cls, shape, plan, **options)
    return fns

  real_build = gpu_plans.build
  monkeypatch.setattr(gpu_plans, 'build', build)
  path = tmp_path / 'bidirectional.json'
  assert gpu_plans.main(['--bidirectional', '--variants', 'pallas', '--shapes', '2x3x4x16',
                         '--rounds', '1', '--calls', '1', '--json', str(path)]) == 0
  rows = json.loads(path.read_text())['rows']
  assert [(r['layer'], r['plan'], r['bidirectional']) for r in rows] == [
    (layer, plan, True) for layer in ('LSTM', 'GRU') for plan in ('default', 'pallas')]
  assert all(r['max_abs_diff_vs_default'] < 1e-5 for r in rows)
  f, _ = built[nr.GRU, (2, 3, 4, 16), 'pallas', (('bidirectional', True),)]
  y = np.asarray(f())
  single, _ = gpu_plans.build(nr.GRU, (2, 3, 4, 16), 'pallas')
  assert y.shape == (2, 3, 32)
  np.testing.assert_allclose(y[..., :16], np.asarray(single()), rtol=0, atol=1e-6)


# -- benchmarks/step_profile.py --------------------------------------------------------------
def test_step_profile_union_counts_overlaps_once():
  from benchmarks import step_profile

  assert step_profile.union_ns([]) == 0
  # disjoint, nested (a while and its body), overlapping, touching
  assert step_profile.union_ns([(0, 10), (20, 5)]) == 15
  assert step_profile.union_ns([(0, 100), (10, 5), (50, 20)]) == 100
  assert step_profile.union_ns([(30, 10), (0, 20), (10, 15)]) == 35  # 0-25, 30-40
  assert step_profile.union_ns([(0, 10), (10, 10)]) == 20


@pytest.mark.parametrize('name,kind', [
  ('nr_lstm_forward', 'kernel'), ('nr_gru_backward [custom-call.4]', 'kernel'),
  ('RNN_blockPersist_fwd_LSTM<float, float, float>', 'kernel'),
  ('LSTM_elementwise_bp1<float, float, float>', 'kernel'),
  ('sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x64x32 [dot.3]', 'gemm'),
  ('cutlass_80_tensorop_s1688gemm_64x64_16x6_nn_align4', 'gemm'), ('aten::addmm', 'gemm'),
  ('Memcpy DtoD (Device -> Device)', 'copy'), ('transpose_copy_fusion', 'copy'),
  ('loop_add_fusion [add.5]', 'other'), ('input_reduce_fusion', 'other'),
])
def test_step_profile_classes_kernels_by_name(name, kind):
  from benchmarks import step_profile

  assert step_profile.kind(name) == kind


def test_step_profile_summarises_per_call():
  """Launches and microseconds per call, each kernel's share of the busy time
  (the union of the kernels' intervals: an overlap counts once), the time by
  class, the kernels sorted by time and cut to ``top``."""
  from benchmarks import step_profile

  us = 1000  # ns
  events = []
  for call in range(2):  # two calls: a forward kernel, a gemm overlapping it, two copies
    t0 = call * 1000 * us
    events += [('nr_lstm_forward', t0, 300 * us), ('sm90_xmma_gemm', t0 + 250 * us, 100 * us),
               ('copy.1', t0 + 400 * us, 10 * us), ('copy.1', t0 + 420 * us, 30 * us)]
  s = step_profile.summarise(events, calls=2, top=2)
  assert s['busy_us'] == pytest.approx(390)  # 0-350 and 400-410, 420-450
  assert s['launches'] == 4
  assert s['kinds_us'] == pytest.approx(dict(kernel=300, gemm=100, copy=40, other=0))
  assert [(o['name'], o['kind'], o['launches'], o['us']) for o in s['ops']] == [
    ('nr_lstm_forward', 'kernel', 1, 300), ('sm90_xmma_gemm', 'gemm', 1, 100)]
  assert s['ops'][0]['share'] == pytest.approx(300 / 390)


def _fake_profile(planes):
  event = lambda name, start, duration, **stats: types.SimpleNamespace(  # noqa: E731
    name=name, start_ns=start, duration_ns=duration, stats=list(stats.items()))
  return types.SimpleNamespace(planes=[
    types.SimpleNamespace(name=name, lines=[
      types.SimpleNamespace(name=line, events=[event(*e[:3], **e[3]) for e in evs])
      for line, evs in lines.items()]) for name, lines in planes.items()]), event


def test_step_profile_reads_the_gpu_streams_else_the_host_ops(monkeypatch):
  """A GPU's kernels come from its plane's stream lines (named with their HLO op
  where it differs), not its other lines nor the host's; without a device plane,
  the host's events that carry an HLO op (XLA:CPU's thunks), said to be host
  times on a GPU."""
  from benchmarks import step_profile

  profile, _ = _fake_profile({
    '/host:CPU': {'python': [('jit_train', 0, 900, {})],
                  'tf_XLA': [('fusion.1', 5, 10, dict(hlo_op='fusion.1')),
                             ('ThunkExecutor::Execute', 0, 50, {})]},
    '/device:GPU:0': {'Stream #13(compute)': [('nr_gru_forward', 100, 40,
                                               dict(hlo_op='custom-call.2')),
                                              ('loop_fusion', 150, 5, dict(hlo_op='loop_fusion'))],
                      'Launch stats': [('ignored', 0, 1000, {})]}})
  events, source = step_profile.device_events(profile)
  assert events == [('nr_gru_forward [custom-call.2]', 100, 40), ('loop_fusion', 150, 5)]
  assert source == '/device:GPU:0'
  del profile.planes[1]
  assert step_profile.device_events(profile) == ([('fusion.1', 5, 10)],
                                                 'host threads (XLA:CPU thunks)')
  monkeypatch.setattr(step_profile.jax, 'default_backend', lambda: 'gpu')
  assert 'NO DEVICE PLANE' in step_profile.device_events(profile)[1]


def test_step_profile_main_profiles_each_variant_and_pytorch(tmp_path, capsys):
  """On the CPU, for real: the scans' forward and training step of a small LSTM,
  and PyTorch's; per call, the scan's loop runs once and its body's ops once a
  step (so the counts are divided by the calls profiled), a row per mode, in the
  JSON as printed."""
  pytest.importorskip('torch')
  from benchmarks import step_profile

  path = tmp_path / 'profile.json'
  assert step_profile.main(['--shapes', '2x12x8x16', '--layers', 'LSTM', '--variants',
                            'default', '--torch', '--calls', '3', '--json', str(path)]) == 0
  rows = json.loads(path.read_text())['rows']
  assert [(r['layer'], r['variant'], r['mode']) for r in rows] == [
    ('LSTM', 'default', 'forward'), ('LSTM', 'default', 'train'), ('LSTM', 'torch', 'forward'),
    ('LSTM', 'torch', 'train')]
  forward = rows[0]
  launches = sorted({o['launches'] for o in forward['ops']})
  assert launches[0] == 1 and launches[-1] == 12, forward['ops']
  assert any(o['name'].startswith('while') and o['launches'] == 1 for o in forward['ops'])
  assert all(r['wall_us'] > 0 and r['busy_us'] > 0 for r in rows)
  assert any(o['name'] == 'aten::lstm' for o in rows[2]['ops'])
  out = capsys.readouterr().out
  assert '(2, 12, 8, 16) LSTM default forward: wall' in out
  assert step_profile.main(['--markdown', str(path)]) == 0  # the saved rows, one table
  table = capsys.readouterr().out.splitlines()
  assert len(table) == 2 + len(rows) and table[2].startswith('| (2, 12, 8, 16) | LSTM | default |')
  f = rows[0]
  assert table[2].split(' | ')[4:6] == [f"{f['wall_us']:.0f}", f"{f['busy_us']:.0f}"]
