"""Fused ``LSTM`` / ``GRU`` against the generic RNN composition and a NumPy loop.

The fused layers differentiate their recurrence by hand (``jax.custom_vjp``);
the generic ``RNN`` / ``Bidirectional`` stack over the *same cells* is
differentiated by JAX, and ``tests.reference`` runs the documented formulas in
float64 NumPy, one row at a time on its unpadded part.
"""

import contextlib
import inspect
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax.test_util import check_grads

import nnx_recurrent as nr
from nnx_recurrent._fused import _plans, _xla, internal
from tests import reference as ref
from tests.jaxprs import equations
from tests.user_cells import lora_swapped

B, T, I, H = 3, 5, 3, 4
LENGTHS = np.array([5, 2, 0], np.int32)


_S, _P = internal.ScanPlan, internal.Plan
PATHS = {  # forward strategies; 'joint' exists for the LSTM only
  'loop': _P(_S('loop', False, 1), _S('loop', False, 1)),
  'hoisted': _P(_S('hoisted', True, 1), _S('hoisted', True, 1)),
  'unrolled': _P(_S('hoisted', False, 2), _S('loop', False, 2)),
  'joint': _P(_S('joint', False, 2), _S('joint', True, 1)),
  'autodiff': _P(_S('loop', False, 1), _S('loop', False, 1), custom_vjp=False),
  'gpu': _P(_S('hoisted', False, 8), _S('hoisted', False, 8), backward_unroll=8),
}


def use_path(path):
  """A context that forces a strategy (chosen from the shapes otherwise: tests are tiny).

  'default': what ``_plan`` picks for these tiny shapes; 'loop': input matmul
  in the loop (large batches); 'hoisted': one input matmul before the loop,
  prefetching scan; 'unrolled': forward scans unrolled twice; 'joint':
  one matmul over ``[x_t, h]`` (prefetched under a gradient); 'gpu': a
  GPU's, every scan unrolled 8 times, the backward one too (longer than the
  tests' sequences: wholly unrolled). The backward pass is the same for all
  of them but 'autodiff' (no custom VJP: JAX differentiates the forward scan;
  the CPU's choice for large GRU batches).
  The plan is read while tracing: call (and compile) the layer inside.
  """
  return contextlib.nullcontext() if path == 'default' else internal.forced_plan(PATHS[path])


@pytest.fixture
def force_path():
  """``force_path(path)`` forces a strategy until the test ends (see :func:`use_path`)."""
  with contextlib.ExitStack() as stack:
    yield lambda path: stack.enter_context(use_path(path))


def build(factory, seed=0):
  """``factory()`` with ``ref.randomize(..., seed)``'s parameters (random biases too:
  a dropped bias cannot pass), built abstractly (``nnx.eval_shape``): no
  initializer runs, and each would compile once per parameter shape. Dropout
  RNG streams get key ``seed`` and count 0 (the tests pass their own keys)."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(factory), nnx.Param, ...)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  params = jax.tree_util.tree_unflatten(
    treedef, [ref.normal(leaf.shape, seed + k, 0.5, leaf.dtype) for k, leaf in enumerate(leaves)])
  rest = jax.tree_util.tree_map(
    lambda leaf: jax.random.key(seed) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    else jnp.asarray(np.zeros(leaf.shape, leaf.dtype)), rest)
  return nnx.merge(graphdef, params, rest)


def make(cls, num_layers=1, bidirectional=False, seed=0, **kw):
  """A randomised ``cls(I, H, ...)`` (:func:`build`)."""
  return build(lambda: cls(I, H, num_layers=num_layers, bidirectional=bidirectional,
                           rngs=nnx.Rngs(seed), **kw), seed)


def random_carry(layer, batch_shape=(B,), seed=1):
  """A non-zero initial carry in the layer's public structure."""
  template = jax.eval_shape(lambda: layer._default_carry(batch_shape))
  leaves, treedef = jax.tree_util.tree_flatten(template)
  return jax.tree_util.tree_unflatten(
    treedef, [ref.normal(leaf.shape, seed + k, 0.5) for k, leaf in enumerate(leaves)])


def generic(layer, x, *, seq_lengths=None, segment_ids=None, initial_carry=None,
            time_major=False, reverse=False, keep_order=False):
  """The same computation with ``RNN`` / ``Bidirectional`` over the layer's cells
  (``reverse``: every layer reversed, in input order between layers)."""
  single = layer.num_layers == 1 and not layer.bidirectional
  carries = (initial_carry,) if single else initial_carry
  finals = []
  for k in range(layer.num_layers):
    last = k == layer.num_layers - 1
    rnn = nr.RNN(layer.forward[k], reverse=reverse, keep_order=keep_order or not last)
    if layer.bidirectional:
      rnn = nr.Bidirectional(rnn, nr.RNN(layer.backward[k]))
    carry, x = rnn(x, seq_lengths=seq_lengths, segment_ids=segment_ids, return_carry=True,
                   time_major=time_major, initial_carry=None if carries is None else carries[k])
    finals.append(carry)
  return (finals[0] if single else tuple(finals)), x


def call(layer, x, dropout_seed=None, run=None, **kw):
  """``layer(x, **kw)`` (or ``run(layer, x)``) under ``jax.jit``: one compilation.
  ``layer`` may be a tuple of modules (for ``run`` only)."""
  graphdef, state = nnx.split(layer) if not isinstance(layer, tuple) else \
    zip(*map(nnx.split, layer))

  @jax.jit
  def f(state, x):
    module = nnx.merge(graphdef, state) if not isinstance(layer, tuple) else \
      tuple(map(nnx.merge, graphdef, state))
    if run is not None:
      return run(module, x)
    rngs = None if dropout_seed is None else nnx.Rngs(dropout=dropout_seed)
    return module(x, rngs=rngs, **kw)

  return f(state, x)


def weighted_loss(out):
  """A loss that weighs every output and carry entry differently."""
  leaves = jax.tree_util.tree_leaves(out)
  return sum(jnp.sum(leaf * ref.normal(leaf.shape, 100 + k)) for k, leaf in enumerate(leaves))


def assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for (path, x), y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol,
                               err_msg=f'leaf {jax.tree_util.keystr(path)}')


def value_and_grads_of(graphdef, run, params, x, carry):
  """``run(nnx.merge(graphdef, params), x, carry)`` and the gradients of a
  weighted loss of it with respect to ``(params, x, carry)`` (to be traced)."""
  def f(params, x, carry):
    return run(nnx.merge(graphdef, params), x, carry)

  out, vjp = jax.vjp(f, params, x, carry)
  _, loss_vjp = jax.vjp(weighted_loss, out)
  return out, vjp(loss_vjp(jnp.ones(()))[0])


def values_and_grads(layer, x, carry, run, *more_runs):
  """``run(layer, x, carry)`` and the gradients of a weighted loss of it, jitted;
  with ``more_runs``, a list of those for each run, all in ONE compilation."""
  graphdef, params = nnx.split(layer)

  @jax.jit
  def every_run(params, x, carry):
    return [value_and_grads_of(graphdef, r, params, x, carry) for r in (run, *more_runs)]

  results = every_run(params, x, carry)
  return results if more_runs else results[0]


def check_against_generic(layer, x, carry0, lengths, time_major=False, segment_ids=None,
                          **tolerances):
  """Values and gradients (parameters, inputs, initial carry) of ``layer`` against
  :func:`generic` over its cells; returns the layer's ``(carry, outputs)``."""
  masks = dict(seq_lengths=lengths, segment_ids=segment_ids, time_major=time_major)
  (out, grads), (out_g, grads_g) = values_and_grads(
    layer, x, carry0, lambda m, x, c: m(x, initial_carry=c, return_carry=True, **masks),
    lambda m, x, c: generic(m, x, initial_carry=c, **masks))
  assert_trees_close(out, out_g, **tolerances)
  assert_trees_close(grads, grads_g, **tolerances)
  return out


# Bit for bit on the CPU; a GPU may add in another order from one run to the next.
BITWISE_ON_CPU = (dict(rtol=0, atol=0) if jax.default_backend() == 'cpu'
                  else dict(rtol=1e-6, atol=1e-7))


def plans_and_generic(layer, paths, reference=None, **masks):
  """ONE jitted function ``(x, carry0) -> (results, expected)``: the values and
  gradients (parameters, inputs, initial carry) of ``layer`` forced to each of
  ``paths`` (``results[path]``; the plan is read while tracing) and of
  :func:`generic` over its cells (``expected``; or of ``reference(m, x,
  carry0)``). One compilation serves every input (e.g. garbage at padding)."""
  graphdef, params = nnx.split(layer)
  if reference is None:
    reference = lambda m, x, c: generic(m, x, initial_carry=c, **masks)  # noqa: E731

  def both(params, x, carry, run):
    f = lambda params, x, carry: run(nnx.merge(graphdef, params), x, carry)  # noqa: E731
    out, vjp = jax.vjp(f, params, x, carry)
    _, loss_vjp = jax.vjp(weighted_loss, out)
    return out, vjp(loss_vjp(jnp.ones(()))[0])

  @jax.jit
  def every_path(params, x, carry):
    results = {}
    for path in paths:
      with use_path(path):
        results[path] = both(params, x, carry, lambda m, x, c: m(
          x, initial_carry=c, return_carry=True, **masks))
    return results, both(params, x, carry, reference)

  return lambda x, carry: every_path(params, x, carry)


def check_plans_against_generic(layer, x, carry0, paths, padding=None, tol=1e-5, reference=None,
                                **masks):
  """Every path of :func:`plans_and_generic` against the generic composition
  (or ``reference``; to ``tol``, absolute and relative);
  with ``padding`` (a boolean ``(*batch, time)`` mask), garbage (NaN, inf,
  1e30) there changes nothing, bit for bit on the CPU, the inputs'
  gradient there is zero and every value and gradient is finite. Returns
  ``{path: ((carry, outputs), grads)}``."""
  run = plans_and_generic(layer, paths, reference, **masks)
  results, expected = run(x, carry0)
  for path, got in results.items():
    try:
      assert_trees_close(got, expected, atol=tol, rtol=tol)
    except AssertionError as e:
      raise AssertionError(f'path {path!r}: {e}') from None
  if padding is not None:
    pad = np.asarray(padding)[..., None]
    for path, got in {**results, 'generic': expected}.items():
      assert not np.asarray(got[1][1])[np.asarray(padding)].any(), path  # d inputs
      assert all(np.isfinite(np.asarray(leaf)).all()
                 for leaf in jax.tree_util.tree_leaves(got)), path
    for fill in (np.nan, np.inf, -np.inf, 1e30):  # NumPy: nothing to compile
      garbage = run(jnp.asarray(np.where(pad, np.asarray(fill, x.dtype), np.asarray(x))), carry0)
      for a, b in zip(jax.tree_util.tree_leaves((results, expected)),
                      jax.tree_util.tree_leaves(garbage)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), **BITWISE_ON_CPU,
                                   err_msg=f'padding {fill}')
  return results


def numpy_layers(layer, x, lengths, carry0):
  """``layer``'s bidirectional layers in float64 NumPy (``tests.reference``):
  ``(carry, outputs)``."""
  xs, carries = np.asarray(x, np.float64), []
  for k in range(layer.num_layers):
    c_f, y_f = ref.rnn(ref.cell_params(layer.forward[k]), xs, lengths, carry0[k][0],
                       num_batch_dims=1)
    c_b, y_b = ref.rnn(ref.cell_params(layer.backward[k]), xs, lengths, carry0[k][1],
                       num_batch_dims=1, reverse=True, keep_order=True)
    xs = np.concatenate([y_f, y_b], axis=-1)
    carries.append((c_f, c_b))
  return tuple(carries), xs


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
# Every other plan with lengths (one layer: a plan only sets how one direction's
# scan runs), garbage at padding: test_fused_padding; the LSTM projected:
# test_fused_projection; packed: test_fused_packing.
@pytest.mark.parametrize('num_layers,bidirectional,time,lengths,paths', [
  (1, False, T, None, ['loop']),
  (2, True, 6, np.array([6, 3, 0], np.int32), ['default']),
], ids=['1-uni-full', '2-bi-lengths'])
def test_matches_generic_values_and_grads(cls, num_layers, bidirectional, time, lengths, paths,
                                         monkeypatch):
  """Values and gradients against the generic composition, each path forced
  (one compilation). Two bidirectional layers with lengths: the CPU's default
  plan for tiny steps (on any machine: a GPU's is the 'gpu' path), whose
  backward scans two steps at a time (an even length); garbage at padding
  inert (the second layer reads the first's outputs, zero at padding); the
  values against the float64 formulas."""
  monkeypatch.setattr(_plans, 'gpu_backend', lambda: False)
  if 'default' in paths:
    assert internal.plan_for(cls, B, 4 * H).backward_pairs and time % 2 == 0
  layer = make(cls, num_layers, bidirectional)
  x = ref.normal((B, time, I), seed=7)
  carry0 = random_carry(layer)
  padding = None if lengths is None else np.arange(time)[None, :] >= lengths[:, None]
  results = check_plans_against_generic(layer, x, carry0, paths, padding, seq_lengths=lengths)
  if lengths is not None:  # the float64 formulas; padding is zero and a length-0 row
    # keeps its initial carry
    assert_trees_close(results['default'][0], numpy_layers(layer, x, lengths, carry0),
                       atol=2e-5, rtol=1e-5)
    for path, (out, _) in results.items():
      assert not np.asarray(out[1][1, 3:]).any() and not np.asarray(out[1][2]).any(), path
      assert_trees_close(jax.tree_util.tree_map(lambda a: a[2], out[0][0]),
                         jax.tree_util.tree_map(lambda a: a[2], carry0[0]), atol=0, rtol=0)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_weight_gradients_through_materialised_transposes(cls, monkeypatch):
  """Large weight-gradient dots take another path (flat_dot_t); force it here
  (one direction: each direction's weight gradients are the same code)."""
  monkeypatch.setattr(_plans, 'TRANSPOSE_MIN_MACS', 0)
  monkeypatch.setattr(cls._math, 'transpose_dw', True)
  layer = make(cls)
  x = ref.normal((B, T, I), seed=11)
  check_against_generic(layer, x, random_carry(layer, seed=12), LENGTHS)


def test_flat_dot_t_materialises_the_transpose_from_its_threshold(monkeypatch):
  """``flat_dot_t(a, b, transpose)`` is the sum over the leading axes of ``a^T
  b`` (NumPy's einsum); the transpose is materialised (an
  ``optimization_barrier`` keeps XLA from folding it into the dot) with
  ``transpose`` from ``TRANSPOSE_MIN_MACS`` multiply-adds on, not below them
  nor without ``transpose``: a speed choice (the test above forces it for the
  layers), read off the program."""
  a, b = ref.normal((2, 3, 4), seed=30), ref.normal((2, 3, 5), seed=31)
  want = np.einsum('tbm,tbn->mn', np.asarray(a, np.float64), np.asarray(b, np.float64))
  macs = 2 * 3 * 4 * 5
  for threshold, transpose, materialised in ((macs, True, True), (macs + 1, True, False),
                                             (0, False, False)):
    monkeypatch.setattr(_plans, 'TRANSPOSE_MIN_MACS', threshold)
    jaxpr = jax.make_jaxpr(lambda a, b, t=transpose: internal.flat_dot_t(a, b, t))(a, b)
    assert ('optimization_barrier' in str(jaxpr)) is materialised, (threshold, transpose)
    np.testing.assert_allclose(np.asarray(internal.flat_dot_t(a, b, transpose)), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('length', [6, 5])
@pytest.mark.parametrize('reverse', [False, True])
def test_prefetch_scan_in_pairs_is_lax_scan(length, reverse):
  """Two steps per iteration (odd lengths: one) against ``jax.lax.scan``."""
  xs = (ref.normal((length, 2, 3), seed=20), jnp.arange(length) % 3 == 0)

  def step(c, inp):
    x, flag = inp
    c = jnp.tanh(c * 0.9 + x) + jnp.where(flag, 1.0, 0.0)
    return c, (c.sum(-1), c * 2.0)

  c0 = ref.normal((2, 3), seed=21)
  got, want = jax.jit(lambda c0, xs: (  # one compilation
    _xla.prefetch_scan(step, c0, xs, length=length, reverse=reverse, unroll=1, pairs=True),
    jax.lax.scan(step, c0, xs, reverse=reverse)))(c0, xs)
  assert_trees_close(got, want, atol=1e-6, rtol=1e-6)


def test_plan_differentiates_large_gru_batches_with_jax_on_the_cpu(monkeypatch):
  monkeypatch.setattr(_plans, 'cpu_backend', lambda: True)  # the CPU's choice, on any machine
  plan = internal.plan_for
  rows = _plans.GRU_AUTODIFF_MIN_ROWS
  assert plan(nr.GRU, rows, 384) == PATHS['autodiff']
  assert plan(nr.GRU, rows - 1, 384).custom_vjp and plan(nr.LSTM, 4 * rows, 512).custom_vjp
  layer = build(lambda: nr.GRU(I, H, rngs=nnx.Rngs(0)))

  def custom_vjp(batch_shape):  # the rows are those of all batch axes
    jaxpr = jax.make_jaxpr(lambda x: layer(x))(jnp.ones((*batch_shape, T, I)))
    return 'custom_vjp_call' in str(jaxpr)

  assert custom_vjp((2, rows // 2 - 1)) and not custom_vjp((2, rows // 2))
  monkeypatch.setattr(_plans, 'cpu_backend', lambda: False)  # e.g. a GPU
  assert plan(nr.GRU, rows, 384).custom_vjp


def test_plan_follows_the_measured_choices(monkeypatch):
  """The scans ``_plans.plan`` picks per step (its module docstring): tiny
  steps (rows * gates * hidden under ``TINY_STEP``) one matmul per step
  without a gradient (the LSTM's joint one), hoisted and unrolled twice under
  one, the backward two steps at a time; under ``HOIST_MAX_ROWS`` rows the
  input projections hoisted and prefetched; under ``JOINT_MAX_ROWS`` the joint
  matmul under a gradient; the loop from there on. A symbolic batch
  (jax.export) gets the loop. The thresholds' values are speed-only (measured
  per machine): the test reads them, and checks the branches and their edges."""
  monkeypatch.setattr(_plans, 'cpu_backend', lambda: False)  # the GRU's custom VJP throughout
  monkeypatch.setattr(_plans, 'gpu_backend', lambda: False)  # the CPU's plans, on any machine
  plan, loop, hoisted = internal.plan_for, _S('loop', False, 1), _S('hoisted', True, 1)
  tiny_step, hoist, joint = _plans.TINY_STEP, _plans.HOIST_MAX_ROWS, _plans.JOINT_MAX_ROWS
  assert 1 < hoist < joint
  for cls, in_loop in ((nr.LSTM, 'joint'), (nr.GRU, 'loop')):
    tiny = _P(_S(in_loop, False, 1), _S('hoisted', False, 2), backward_pairs=True)
    assert plan(cls, 1, tiny_step - 1) == tiny, cls
    assert plan(cls, 1, tiny_step) == plan(cls, hoist - 1, tiny_step) == _P(hoisted, hoisted)
    assert plan(cls, hoist, tiny_step) == plan(cls, joint - 1, tiny_step) == _P(
      loop, _S(in_loop, False, 1)), cls
    assert plan(cls, joint, tiny_step) == plan(cls, joint * tiny_step, 1) == _P(loop, loop), cls
    rows, = export.symbolic_shape('b')
    assert plan(cls, rows, tiny_step) == _P(loop, loop), cls


def test_a_gpu_machine_plans_computations_placed_on_its_cpu_as_the_cpu(monkeypatch):
  """Under ``jax.default_device(cpu)`` on a GPU machine the scans take the CPU's
  measured plans (the GRU differentiated by JAX from 128 rows on included),
  not the GPU's unrolled ones."""
  plan = internal.plan_for
  rows = (1, 16, _plans.GRU_AUTODIFF_MIN_ROWS)
  cpu = {(cls, r): plan(cls, r, 1) for cls in (nr.LSTM, nr.GRU) for r in rows}
  assert plan(nr.GRU, _plans.GRU_AUTODIFF_MIN_ROWS, 1).custom_vjp is False
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(_plans, 'cpu_backend', lambda: False)  # cached per process: as on a GPU
  assert all(plan(cls, r, 1) == PATHS['gpu'] or plan(cls, r, 1).primal.unroll == 4
             for cls, r in cpu)
  with jax.default_device(jax.devices('cpu')[0]):
    assert {key: plan(*key, 1) for key in cpu} == cpu


def test_plan_on_a_gpu_unrolls_every_scan(monkeypatch):
  """On a GPU (``_plans`` says what was measured): the input projections
  hoisted and every scan unrolled ``GPU_UNROLL`` times, the backward one too,
  at every shape, tiny steps included; the LSTM's forward without a gradient 4
  times from ``GPU_LSTM_UNROLL4_MIN_ROWS`` rows on; a symbolic batch keeps the
  loop. The values: the 'gpu' path, forced in the tests of every plan."""
  monkeypatch.setattr(_plans, 'gpu_backend', lambda: True)
  monkeypatch.setattr(_plans, 'cpu_backend', lambda: False)
  plan, gpu, rows4 = internal.plan_for, PATHS['gpu'], _plans.GPU_LSTM_UNROLL4_MIN_ROWS
  assert _plans.GPU_UNROLL == 8 and rows4 > _plans.HOIST_MAX_ROWS
  four = gpu._replace(primal=_S('hoisted', False, 4))
  for cls in (nr.LSTM, nr.GRU):
    assert plan(cls, 1, 1) == plan(cls, rows4 - 1, _plans.TINY_STEP) == gpu, cls
    large = four if cls is nr.LSTM else gpu
    assert plan(cls, rows4, 1) == plan(cls, 4 * _plans.GRU_AUTODIFF_MIN_ROWS, 4096) == large, cls
    for rows in (1, rows4):  # what the fuzzer forces
      assert internal.gpu_plan(cls, rows) == plan(cls, rows, 1), (cls, rows)
    rows, = export.symbolic_shape('b')
    loop = _S('loop', False, 1)
    assert plan(cls, rows, 1) == _P(loop, loop), cls


def test_machine_probes(monkeypatch):
  """``cuda_backend``: an NVIDIA GPU only (not ROCm, whose MIOpen packs the
  gates in another order; not without any backend); ``cpu_backend``: the CPU
  only (the plans' measurements). Uncached here."""
  def gpu(version, platform='gpu'):
    return types.SimpleNamespace(platform=platform,
                                 client=types.SimpleNamespace(platform_version=version))

  for version, cuda in (('cuda 12080', True), ('rocm 60302 (ROCm 6.3.2)', False),
                        ('PJRT C API', True)):
    monkeypatch.setattr(jax, 'devices', lambda version=version: [gpu(version)])
    assert internal.cuda_backend.__wrapped__() is cuda, version
  monkeypatch.setattr(jax, 'devices', lambda: [gpu('cpu', platform='cpu')])
  assert internal.cuda_backend.__wrapped__() is False

  def no_backend():
    raise RuntimeError('Unable to initialize backend')

  monkeypatch.setattr(jax, 'devices', no_backend)
  assert internal.cuda_backend.__wrapped__() is False
  for backend, cpu in (('cpu', True), ('gpu', False), ('tpu', False)):
    monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
    assert _plans.cpu_backend.__wrapped__() is cpu, backend
    assert _plans.gpu_backend() is (backend == 'gpu'), backend


def test_forced_plans_nest_and_restore():
  default = internal.plan_for(nr.LSTM, B, 4 * H)
  with internal.forced_plan(PATHS['loop']) as outer:
    assert outer == PATHS['loop']
    with internal.forced_plan(PATHS['hoisted']):
      assert internal.plan_for(nr.GRU, 1024, 16) == PATHS['hoisted']
    assert internal.plan_for(nr.LSTM, B, 4 * H) == outer
  assert internal.plan_for(nr.LSTM, B, 4 * H) == default
  with pytest.raises(ZeroDivisionError), internal.forced_plan(PATHS['loop']):
    1 / 0
  assert internal.plan_for(nr.LSTM, B, 4 * H) == default


def traced_scans(layer, x, in_features, hidden):
  """How the scans of ``layer(x)`` ran, read off ONE traced program of its
  output and, under a gradient, of its forward and backward: ``[forward,
  train, (length, unroll)]``, each forward as a ``ScanPlan`` (the inputs from
  the widths its body's matmuls contract: ``in_features + hidden`` joint,
  ``hidden`` alone after a hoisted projection, each apart in the loop;
  prefetching from a dynamic slice of the sequence in its body)."""
  graphdef, state = nnx.split(layer)
  inputs = {(in_features + hidden,): 'joint', (hidden,): 'hoisted',
            (in_features, hidden): 'loop'}
  run = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
  # (make_jaxpr keeps a function's trace: a new function each call, read while tracing)
  jaxpr = jax.make_jaxpr(lambda x: (run(x), jax.grad(lambda x: run(x).sum())(x)))(x)
  found = []
  for eqn in equations(jaxpr.jaxpr):
    if eqn.primitive.name == 'scan':
      body = list(equations(eqn.params['jaxpr'].jaxpr))
      widths = tuple(sorted(e.invars[0].aval.shape[-1] for e in body
                            if e.primitive.name == 'dot_general'))
      found.append((eqn.params['length'], eqn.params['unroll']) if eqn.params['reverse']
                   else _S(inputs[widths], any(e.primitive.name == 'dynamic_slice' for e in body),
                           eqn.params['unroll']))
  return found


def test_the_plan_reaches_the_scans(monkeypatch):
  """A plan changes no value (the tests of every path above) but how the scans
  run: the forward scans, without a gradient and under one, compute their gate
  pre-activations, prefetch and unroll as the plan says, and the backward scan
  unrolls and runs two steps per iteration (half the iterations) as it says;
  a call's measured plan is the one for its rows (all batch axes) and gate
  width (gates times hidden: 2 rows of 4 * 128 columns are not a tiny step)."""
  layer = build(lambda: nr.LSTM(I, H, rngs=nnx.Rngs(0)))
  x = jnp.ones((B, 6, I))
  for plan in (_P(_S('joint', False, 3), _S('hoisted', True, 2), backward_pairs=True),
               _P(_S('hoisted', True, 1), _S('loop', False, 1), backward_unroll=4)):
    with internal.forced_plan(plan):
      scans = traced_scans(layer, x, I, H)
    assert scans == [plan.primal, plan.train,
                     (3 if plan.backward_pairs else 6, plan.backward_unroll)], plan
  monkeypatch.setattr(_plans, 'gpu_backend', lambda: False)  # the CPU's plans, on any machine
  hoisted = _S('hoisted', True, 1)
  params = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((I, 512), (512,), (128, 512))]
  xs = jax.ShapeDtypeStruct((6, 2, 1, I), jnp.float32)  # (time, *batch, features): 2 rows
  assert _plans.plan_for_call(nr.LSTM._math, [*params, None], xs) == internal.plan_for(
    nr.LSTM, 2, 4 * 128) == _P(hoisted, hoisted)


def test_large_gru_batch_matches_generic(monkeypatch):
  """Two batch axes of 2 x 64 rows: the plan is JAX's differentiation (garbage
  at padding inert). The CPU's choice, on any machine (a GPU keeps the custom
  VJP). One direction: the plan sets how a direction's scan runs (several
  batch axes in a bidirectional layer: test_time_major_and_several_batch_axes)."""
  monkeypatch.setattr(_plans, 'cpu_backend', lambda: True)
  layer = make(nr.GRU, seed=13)
  assert internal.plan_for(nr.GRU, 2 * 64, 3 * H) == PATHS['autodiff']  # no custom VJP
  x = ref.normal((2, 64, T, I), seed=14)
  lengths = np.random.default_rng(15).integers(0, T + 1, (2, 64))
  padding = np.arange(T) >= lengths[..., None]  # garbage there changes nothing
  check_plans_against_generic(layer, x, random_carry(layer, (2, 64), seed=16), ['default'],
                              padding, seq_lengths=jnp.asarray(lengths))


@pytest.mark.parametrize('cls', [nr.LSTM])  # the masks and layout code is shared by both
def test_time_major_and_several_batch_axes(cls, force_path):
  force_path('loop')
  layer = make(cls, 1, True, time_major=True)
  x = ref.normal((T, 2, 2, I), seed=3)  # (time, batch, batch, features)
  lengths = jnp.array([[5, 1], [3, 0]])
  out = check_against_generic(layer, x, random_carry(layer, (2, 2)), lengths, time_major=True)
  assert out[1].shape == (T, 2, 2, 2 * H)


@pytest.mark.parametrize('cls,num_layers,keep_order', [(nr.LSTM, 2, False), (nr.GRU, 1, True)])
def test_reverse_matches_generic(cls, num_layers, keep_order):
  """``reverse`` / ``keep_order`` of a one-direction layer are ``nr.RNN``'s: each row
  from its last valid step to its first, outputs in processing order unless kept."""
  layer = make(cls, num_layers, seed=21)
  x = ref.normal((B, T, I), seed=22)
  carry0 = random_carry(layer, seed=23)
  kw = dict(seq_lengths=LENGTHS, reverse=True, keep_order=keep_order)
  (out, grads), (out_g, grads_g) = values_and_grads(
    layer, x, carry0, lambda m, x, c: m(x, initial_carry=c, return_carry=True, **kw),
    lambda m, x, c: generic(m, x, initial_carry=c, **kw))
  assert_trees_close(out, out_g)
  assert_trees_close(grads, grads_g)
  # The attributes are the defaults of the call.
  layer.reverse, layer.keep_order = True, keep_order
  assert_trees_close(call(layer, x, initial_carry=carry0, seq_lengths=LENGTHS), out[1])


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_constructor_flags_are_the_calls_defaults(cls):
  """``reverse``, ``keep_order``, ``time_major`` and ``return_carry`` given to
  the constructor (each class passes its own on) are what ``nr.RNN`` over the
  cell does with them: time-major rows run from their last valid step, the
  outputs in input order, and the carry returned."""
  layer = make(cls, reverse=True, keep_order=True, time_major=True, return_carry=True)
  x = ref.normal((T, B, I), seed=27)
  got, want = call(layer, x, run=lambda m, x: (m(x, seq_lengths=LENGTHS), nr.RNN(
    m.forward[0], reverse=True, keep_order=True, time_major=True, return_carry=True)(
      x, seq_lengths=LENGTHS)))
  assert_trees_close(got, want)


def cell_grads(grads, *path):
  """The gradient leaves of the cells under ``path`` in an ``nnx.State``."""
  for key in path:
    grads = grads[key]
  return jax.tree_util.tree_leaves(grads)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_bidirectional_of_two_fused_layers_is_the_bidirectional_layer(cls):
  """``nr.Bidirectional(nr.LSTM(...), nr.LSTM(...))`` with the cells of
  ``nr.LSTM(..., bidirectional=True)``: the same values and gradients."""
  both = make(cls, 1, True, seed=24)
  fwd, bwd = make(cls, seed=0), make(cls, seed=1)
  nnx.update(fwd.forward[0], nnx.state(both.forward[0]))
  nnx.update(bwd.forward[0], nnx.state(both.backward[0]))
  pair = nr.Bidirectional(fwd, bwd)
  x = ref.normal((B, T, I), seed=25)
  carry0 = random_carry(both, seed=26)  # ((carry_f, carry_b),): one layer
  out, grads = values_and_grads(both, x, carry0, lambda m, x, c: m(
    x, initial_carry=c, seq_lengths=LENGTHS, return_carry=True))
  out_p, grads_p = values_and_grads(pair, x, carry0[0], lambda m, x, c: m(
    x, initial_carry=c, seq_lengths=LENGTHS, return_carry=True))
  assert_trees_close((out[0][0], out[1]), out_p)
  assert_trees_close((grads[1], grads[2][0]), grads_p[1:])  # inputs, initial carries
  for a, b in ((('forward',), ('forward_rnn', 'forward')),
               (('backward',), ('backward_rnn', 'forward'))):
    for ga, gb in zip(cell_grads(grads[0], *a), cell_grads(grads_p[0], *b)):
      np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('cls,paths', [
  (nr.LSTM, ['default', 'loop', 'hoisted', 'unrolled', 'joint', 'gpu']),
  (nr.GRU, ['default', 'hoisted', 'gpu']),
], ids=['LSTM', 'GRU'])
def test_forward_without_gradient_matches_generic(cls, paths):
  """The primal forward (no gradient taken) has its own strategy; check each
  (all forced in one compilation, with the generic composition). ``keep_order``
  without ``reverse`` changes nothing (a bidirectional layer's outputs stay in
  input order)."""
  layer = make(cls, 1, True)
  x = ref.normal((B, T, I), seed=8)
  carry0 = random_carry(layer, seed=9)
  kw = dict(initial_carry=carry0, seq_lengths=LENGTHS)

  def every_path(m, x):
    outs = {}
    for path in paths:
      with use_path(path):  # read while tracing
        outs[path] = m(x, return_carry=True, keep_order=True, **kw)
    return outs, generic(m, x, **kw)

  outs, expected = call(layer, x, run=every_path)
  for path, out in outs.items():
    try:
      assert_trees_close(out, expected)
    except AssertionError as e:
      raise AssertionError(f'path {path!r}: {e}') from None


def check_grads_of_vector(layer, x, carry0, lengths):
  """``check_grads`` (first order, reverse mode) of ``layer``'s ``(carry,
  outputs)`` with respect to its parameters, ``x`` and ``carry0`` together,
  passed as ONE vector: the random directions and steps are drawn over all of
  them as over separate arguments, but the eager arithmetic of the check
  compiles once, not once per parameter shape."""
  graphdef, params = nnx.split(layer)
  leaves, treedef = jax.tree_util.tree_flatten((params, x, carry0))
  shapes = [np.shape(leaf) for leaf in leaves]
  vector = jnp.asarray(np.concatenate([np.ravel(leaf) for leaf in leaves]))
  ends = np.cumsum([int(np.prod(shape)) for shape in shapes])

  @jax.jit
  def f(vector):
    parts = [vector[end - int(np.prod(shape)):end].reshape(shape)
             for shape, end in zip(shapes, ends)]
    params, x, carry0 = jax.tree_util.tree_unflatten(treedef, parts)
    return nnx.merge(graphdef, params)(x, initial_carry=carry0, seq_lengths=lengths,
                                       return_carry=True)

  check_grads(f, (vector,), order=1, modes=('rev',), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('cls,path', [(nr.LSTM, 'joint'), (nr.GRU, 'loop')])
def test_check_grads_float64(cls, path, force_path):
  """Finite differences of the hand-written VJP, in float64 (parameters,
  inputs and initial carry: :func:`check_grads_of_vector`), one direction (a
  bidirectional layer runs the same VJP per direction; both directions' finite
  differences, of the inputs' gradient on the default plan:
  test_second_order_float64)."""
  force_path(path)
  with jax.enable_x64(True):
    layer = build(lambda: cls(2, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(0).standard_normal((2, 3, 2))
    carry0 = jax.tree_util.tree_map(lambda a: np.full(a.shape, 0.3, a.dtype),
                                    jax.eval_shape(lambda: layer._default_carry((2,))))
    check_grads_of_vector(layer, x, carry0, jnp.array([3, 2]))


@pytest.mark.parametrize('cls,implementation', [(nr.LSTM, 'xla'), (nr.GRU, 'pallas')])
def test_vmap_over_examples_equals_each_example_alone(cls, implementation):
  """``jax.vmap`` over a leading axis of examples (each a batch of rows with
  its own lengths, 0 among them, and its own initial carry): outputs, final
  carries and the gradients of the inputs, parameters and carries equal the
  layer called on each example alone (batching rules of the scans and of
  the Pallas kernels); garbage at padding inert."""
  layer = make(cls, 1, True, seed=71, implementation=implementation)
  graphdef, params = nnx.split(layer)
  n = 2  # two examples: their rows' lengths differ, each has a full and an empty row
  x = np.stack([ref.normal((B, T, I), seed=72 + k) for k in range(n)])
  lengths = np.array([[5, 2, 0], [0, 5, 1]], np.int32)
  x = np.where(np.arange(T)[None, None, :, None] < lengths[..., None, None], x, np.nan)
  carries = [random_carry(layer, seed=80 + k) for k in range(n)]
  carry = jax.tree_util.tree_map(lambda *a: np.stack(a), *carries)

  def one(params, x, lengths, carry):
    return nnx.merge(graphdef, params)(x, seq_lengths=lengths, initial_carry=carry,
                                       return_carry=True)

  def loss(params, x, carry, run):
    final, y = run(params, x, carry)
    return jnp.sum(jnp.tanh(y) ** 2) + sum(jnp.sum(a ** 3) for a in jax.tree_util.tree_leaves(
      final)), (final, y)

  def batched(params, x, carry):
    return jax.vmap(one, in_axes=(None, 0, 0, 0))(params, x, jnp.asarray(lengths), carry)

  def looped(params, x, carry):
    outs = [one(params, x[k], jnp.asarray(lengths[k]), jax.tree_util.tree_map(
      lambda a, k=k: a[k], carry)) for k in range(n)]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)

  @jax.jit
  def both(params, x, carry):
    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return grad(params, x, carry, batched), grad(params, x, carry, looped)

  (g_vmap, out_vmap), (g_loop, out_loop) = both(params, x, carry)
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(
    (out_vmap, g_vmap)))
  assert_trees_close(out_vmap, out_loop)
  assert_trees_close(g_vmap, g_loop)
  padding = np.arange(T)[None, None, :] >= lengths[..., None]
  assert not np.asarray(g_vmap[1])[padding].any()  # the inputs' gradient: zero at padding


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_second_order_float64(cls):
  """Second order (a gradient of the gradient, as ``jax.hessian`` needs)
  differentiates the hand-written backward scan: finite differences of it, in
  float64, both directions and a padded row. Pallas says it has none
  (``tests/test_pallas.py``)."""
  with jax.enable_x64(True):
    layer = build(lambda: cls(2, 3, bidirectional=True, param_dtype=jnp.float64,
                              implementation='xla', rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 2)))
    lengths = jnp.array([3, 2])
    check_grads(jax.jit(lambda x: layer(x, seq_lengths=lengths)), (x,), order=2,
                modes=('rev',), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_float64_initial_carry_computes_in_float64(cls):
  """Under x64 a float64 ``initial_carry`` into a float32 layer computes in
  float64, as the cells' own steps promote ``h W_h`` (and flax.nnx's do): the
  outputs and carry are float64 and equal the float64 NumPy formulas (they
  were float32, 1e-7 off)."""
  with jax.enable_x64(True):
    layer = build(lambda: cls(I, H, bidirectional=True, rngs=nnx.Rngs(0)))
    x = ref.normal((B, T, I), seed=1)
    carry0 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)),
                                    random_carry(layer, seed=2))
    carry, y = call(layer, x, initial_carry=carry0, seq_lengths=LENGTHS, return_carry=True)
    xs = np.asarray(x, np.float64)
    (f0, b0), = carry0  # one layer, two directions
    c_f, y_f = ref.rnn(ref.cell_params(layer.forward[0]), xs, LENGTHS, f0, num_batch_dims=1)
    c_b, y_b = ref.rnn(ref.cell_params(layer.backward[0]), xs, LENGTHS, b0, num_batch_dims=1,
                       reverse=True, keep_order=True)
  assert y.dtype == jnp.float64
  assert {a.dtype for a in jax.tree_util.tree_leaves(carry)} == {jnp.dtype(jnp.float64)}
  np.testing.assert_allclose(np.asarray(y), np.concatenate([y_f, y_b], -1), atol=1e-12)
  assert_trees_close(carry, ((c_f, c_b),), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_float64_inputs_compute_in_float64(cls):
  """Under x64 float64 inputs into a float32 layer compute in float64, as
  nnx.Linear promotes them in the cells' own steps: float64 outputs equal to
  nr.RNN's over the cell, the carry kept in float32 as nr.RNN keeps it (the
  computation dtype read off the parameters and carry alone gave float32
  outputs)."""
  with jax.enable_x64(True):
    layer = make(cls)
    x = jnp.asarray(np.asarray(ref.normal((B, T, I), seed=1), np.float64))
    got, want = call(layer, x, run=lambda m, x: (
      m(x, seq_lengths=LENGTHS, return_carry=True),
      nr.RNN(m.forward[0])(x, seq_lengths=LENGTHS, return_carry=True)))
  assert got[1].dtype == want[1].dtype == jnp.float64
  assert {a.dtype for a in jax.tree_util.tree_leaves(got[0])} == {jnp.dtype(jnp.float32)}
  assert_trees_close(got, want, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_single_layer_carry_is_the_cells(cls):
  """One unidirectional layer: the carry of ``nr.RNN`` over the cell, time step 1 and 0
  (one compilation); with 0 steps the carry passes through, its gradient too."""
  layer = make(cls)
  x = ref.normal((B, 1, I), seed=2)
  carry0 = random_carry(layer)

  def carry_sum(m, c):
    return sum(a.sum() for a in jax.tree_util.tree_leaves(
      m(x[:, :0], initial_carry=c, return_carry=True)[0]))

  (carry, y), (carry_g, y_g), (carry_0, y_0), dcarry_0 = call(layer, x, run=lambda m, x: (
    m(x, return_carry=True), nr.RNN(m.forward[0])(x, return_carry=True),
    m(x[:, :0], initial_carry=carry0, return_carry=True),
    jax.grad(lambda c: carry_sum(m, c))(carry0)))
  assert_trees_close((carry, y), (carry_g, y_g))
  assert y_0.shape == (B, 0, H)
  assert_trees_close(carry_0, carry0, atol=0, rtol=0)
  assert_trees_close(dcarry_0, jax.tree_util.tree_map(np.ones_like, carry0), atol=0, rtol=0)


def test_parameter_layout():
  lstm = nnx.eval_shape(lambda: nr.LSTM(3, 4, num_layers=2, bidirectional=True,
                                        param_dtype=jnp.float16, rngs=nnx.Rngs(0)))
  assert isinstance(lstm.forward[1], nr.OptimizedLSTMCell)
  assert {p.dtype for p in jax.tree_util.tree_leaves(nnx.state(lstm, nnx.Param))} == {
    jnp.dtype(jnp.float16)}
  assert lstm.forward[0].dense_i.kernel.shape == (3, 16)
  assert lstm.backward[1].dense_i.kernel.shape == (8, 16)
  assert lstm.forward[1].dense_h.bias.shape == (16,)
  gru = nnx.eval_shape(lambda: nr.GRU(3, 4, num_layers=2, param_dtype=jnp.bfloat16,
                                      rngs=nnx.Rngs(0)))
  assert gru.backward is None and isinstance(gru.forward[1], nr.GRUCell)
  assert {p.dtype for p in jax.tree_util.tree_leaves(nnx.state(gru, nnx.Param))} == {
    jnp.dtype(jnp.bfloat16)}
  assert gru.forward[1].dense_i.kernel.shape == (4, 12)
  assert gru.forward[0].bias_hn.shape == (4,)
  # No PRNG state without dropout (checkpoints stay plain parameters).
  assert not jax.tree_util.tree_leaves(nnx.state(gru, nnx.RngState))


@pytest.mark.parametrize('cls', [nr.GRU])  # the dropout between layers is shared by both
def test_dropout_between_layers(cls):
  """Two layers in training mode: the same key drops the same units, and drops
  some; in eval mode (set inside: read while tracing) the generic composition.
  One layer: nothing between layers, so training mode changes nothing, and
  a call's rngs without a dropout stream serve (nothing draws). One
  compilation."""
  x = ref.normal((B, T, I), seed=1)

  def run(layers, x):
    layer, single = layers
    plain = generic(layer, x)[1]
    train_a, train_b = (layer(x, rngs=nnx.Rngs(dropout=3)) for _ in range(2))
    single_train, single_plain = single(x, rngs=nnx.Rngs(dropout=3)), nr.RNN(single.forward[0])(x)
    single_no_stream = single(x, rngs=nnx.Rngs(params=3))
    layer.eval()
    return plain, train_a, train_b, layer(x), single_train, single_plain, single_no_stream

  plain, train_a, train_b, evaluated, single_train, single_plain, single_no_stream = call(
    (make(cls, 2, dropout_rate=0.5), make(cls, 1, dropout_rate=0.5)), x, run=run)
  np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_b))
  assert not np.allclose(np.asarray(train_a), np.asarray(plain), atol=1e-3)
  np.testing.assert_allclose(np.asarray(evaluated), np.asarray(plain), atol=1e-5)
  np.testing.assert_allclose(np.asarray(single_train), np.asarray(single_plain), atol=1e-5)
  np.testing.assert_allclose(np.asarray(single_no_stream), np.asarray(single_plain), atol=1e-5)


def test_a_raw_key_gives_each_gap_between_layers_its_own_mask():
  """As StackedRNN: a PRNG key given at call time is split, one key per gap
  between layers (the key itself gave every gap the same mask)."""
  masks = []  # traced, returned by the one compilation

  class Recorder(nnx.Module):  # the layer's dropout between layers, observed
    def __init__(self):
      self.inner = nnx.Dropout(0.5)

    def __call__(self, x, rngs=None):
      y = self.inner(x, rngs=rngs)
      masks.append(y == 0)
      return y

  def run(m, x):
    for _ in range(2):
      m(x, rngs=jax.random.key(0))
    recorded = list(masks)
    masks.clear()
    return recorded

  layer = build(lambda: nr.GRU(I, H, num_layers=3, dropout_rate=0.5, rngs=nnx.Rngs(0)))
  layer.dropout = Recorder()
  x = ref.normal((B, T, I), seed=1)
  first, second, again, _ = map(np.asarray, call(layer, x, run=run))
  assert 0.3 < first.mean() < 0.7 and 0.3 < second.mean() < 0.7
  assert 0.3 < (first == second).mean() < 0.7  # independent masks
  np.testing.assert_array_equal(again, first)  # the same key, the same masks
  for mask, key in zip((first, second), jax.random.split(jax.random.key(0), 2)):
    # the key split in two, flax's nnx.Dropout drawing from each part
    np.testing.assert_array_equal(mask, nnx.Dropout(0.5)(jnp.ones(mask.shape), rngs=key) == 0)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])  # each class passes its dtype on
def test_bfloat16_computation(cls):
  layer = make(cls, dtype=jnp.bfloat16)
  full = make(cls)  # the same parameters, the float32 computation
  x = ref.normal((B, T, I), seed=1)
  (carry, y), expected = call((layer, full), x, run=lambda m, x: (
    m[0](x, return_carry=True), nr.RNN(m[1].forward[0])(x)))
  float32 = {jnp.dtype(jnp.float32)}
  assert y.dtype == jnp.bfloat16 and {a.dtype for a in jax.tree_util.tree_leaves(carry)} == float32
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(expected), atol=5e-2)
  no_step = jax.eval_shape(lambda x: layer(x, return_carry=True), x[:, :0])  # as with steps
  assert no_step[1].dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree_util.tree_leaves(no_step[0])} == float32


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
@pytest.mark.parametrize('implementation', ['xla', 'pallas'])
@pytest.mark.parametrize('packed', [False, True], ids=['lengths', 'packed'])
def test_a_numpy_float64_initial_carry_runs_without_a_warning(cls, implementation, packed):
  # Without x64 JAX holds a NumPy float64 carry as float32: the returned carry
  # is float32, with no warning about a float64 it cannot make (as nr.RNN's
  # and flax.nnx's cells give none).
  if jax.config.jax_enable_x64:
    pytest.skip('a float64 carry is float64 under x64')
  layer = make(cls, implementation=implementation)
  x = ref.normal((B, T, I), seed=1)
  carry0 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), random_carry(layer))
  masks = (dict(segment_ids=jnp.ones((B, T), jnp.int32)) if packed
           else dict(seq_lengths=jnp.asarray(LENGTHS)))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    carry, y = layer(x, initial_carry=carry0, return_carry=True, **masks)
  assert {a.dtype for a in jax.tree_util.tree_leaves(carry)} == {jnp.dtype(jnp.float32)}
  lengths = np.full(B, T) if packed else LENGTHS
  want_carry, want_y = ref.rnn(ref.cell_params(layer.forward[0]), x, lengths, carry0,
                               num_batch_dims=1)
  assert_trees_close((carry, y), (want_carry, want_y))


def test_eager_calls_read_device_lengths_and_ids_by_explicit_transfers():
  # The concrete checks (a negative length, float lengths that are whole
  # numbers, a negative id) read device values with jax.device_get, which
  # jax.transfer_guard_device_to_host('disallow') allows: NumPy's implicit read
  # raised there on a GPU, where flax's eager calls (which read nothing) run.
  # On a CPU the guard refuses nothing; gpu.sh runs this file on the GPU.
  x = ref.normal((B, T, I), seed=3)
  layers = {'fused': make(nr.LSTM), 'rnn': nr.RNN(nr.GRUCell(I, H, rngs=nnx.Rngs(0)))}
  masks = [dict(seq_lengths=jnp.asarray(LENGTHS)),  # ints, floats (whole numbers), ids
           dict(seq_lengths=jnp.asarray(LENGTHS, jnp.float32)),
           dict(segment_ids=jnp.asarray(np.arange(T) < LENGTHS[:, None], jnp.int32))]
  for name, layer in layers.items():
    cell = layer.forward[0] if name == 'fused' else layer.cell
    carry0 = jax.tree_util.tree_map(np.asarray, cell.initialize_carry((B, I)))
    want = ref.rnn(ref.cell_params(cell), x, LENGTHS, carry0, num_batch_dims=1)
    for mask in masks:
      with jax.transfer_guard_device_to_host('disallow'):
        got = layer(x, return_carry=True, **mask)
      assert_trees_close(got, want)
      with jax.transfer_guard_device_to_host('disallow'), pytest.raises(
          ValueError, match='non-negative'):
        bad = {k: v.at[0].set(-1) for k, v in mask.items()}
        layer(x, **bad)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_errors(cls):
  name = cls.__name__
  with pytest.raises(ValueError, match=rf'{name}: `in_features` expected a positive int, got 0'):
    cls(0, 4, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=rf'{name}: `hidden_features` expected a positive int'):
    cls(3, 4.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=rf'{name}: `num_layers` expected a positive int, got 0'):
    cls(3, 4, num_layers=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=rf'{name}: `dropout_rate` expected a float in \[0, 1\)'):
    cls(3, 4, dropout_rate=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=rf'{name}: `rngs` expected an nnx.Rngs, got int'):
    cls(3, 4, rngs=0)
  layer = build(lambda: cls(3, 4, num_layers=2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=rf'{name}: `inputs` expected last axis of size 3'):
    layer(jnp.ones((2, 5, 7)))
  with pytest.raises(ValueError, match=rf'{name}: `seq_lengths` expected non-negative lengths, '
                     r'got minimum -1\.'):
    layer(jnp.ones((2, 5, 3)), seq_lengths=jnp.array([6, -1]))
  # One layer's carry for two: the LSTM's (c, h) reads as two layers' carries.
  one_layer = layer.forward[0].initialize_carry((2, 3))
  with pytest.raises(ValueError, match=(
      r"LSTM: `initial_carry\[0\]` expected the cell's carry, a pair \(c, h\) of arrays, got array"
      if cls is nr.LSTM else r'GRU: `initial_carry` expected a tuple of 2 carries \(one per '
      r'layer, None for the default\), got ArrayImpl')):
    layer(jnp.ones((2, 5, 3)), initial_carry=one_layer)
  reverse = rf'{name}: `reverse` expected False for a bidirectional layer \(it runs both ' \
            r'directions already\), got True'
  with pytest.raises(ValueError, match=reverse):
    cls(3, 4, bidirectional=True, reverse=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=reverse):
    build(lambda: cls(3, 4, bidirectional=True, rngs=nnx.Rngs(0)))(jnp.ones((2, 5, 3)),
                                                                   reverse=True)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_cells_changed_by_lora_surgery_are_refused_not_run_as_built(cls):
  """The layer reads its cells' kernels and runs its own step: a cell whose
  projection nnx's LoRA surgery swapped for an ``nnx.LoRALinear`` (which
  ``RNN`` over the cell runs, as flax.nnx's does) is a TypeError naming it,
  not run silently without its adapter (zero gradient for the LoRA weights)."""
  name, cell = cls.__name__, cls._cell_type.__name__
  layer = cls(3, 4, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 5, 3))
  layer(x)  # as built
  target = layer.backward[1]
  plain = nnx.clone(target)
  lora_swapped(target)  # the same kernel (and bias), and an adapter
  h = jnp.ones((2, 5, 8))
  assert not np.allclose(nr.RNN(target)(h), nr.RNN(plain)(h))  # which RNN runs
  expected = (rf"{name}: `backward\[1\]` expected the layer's own {cell}, of nnx.Linear "
              r'projections \(the layer reads their parameters .* e\.g\. by LoRA, as '
              r'nr\.StackedRNN of nr\.RNN or nr\.Bidirectional over them\), got ')
  with pytest.raises(TypeError, match=expected + f'{cell} with dense_h of type LoRALinear.'):
    layer(x)
  with pytest.raises(TypeError, match=expected + f'{cell} with dense_h of type LoRALinear.'):
    nnx.jit(lambda m, x: m(x))(layer, x)
  layer.backward[1] = nr.LSTMCell(8, 4, rngs=nnx.Rngs(0)) if cls is nr.LSTM \
    else nr.MGUCell(8, 4, rngs=nnx.Rngs(0))
  other = 'LSTMCell' if cls is nr.LSTM else 'MGUCell'
  with pytest.raises(TypeError, match=expected + f'cell type {other}.'):
    layer(x)


@pytest.mark.parametrize('layer', [nr.LSTM, nr.GRU])
def test_parameter_metadata_and_initializers_reach_every_cell(layer):
  """kernel/recurrent/bias (and the LSTM's projection) metadata (e.g. sharding
  names) land on every cell's params, and each initializer initialises its
  parameters (traced only: ``nnx.eval_shape``)."""
  calls = []

  def init(tag):
    def f(key, shape, dtype=jnp.float32):
      calls.append((tag, tuple(shape)))
      return jnp.zeros(shape, dtype)
    return f

  proj = dict(proj_features=2, proj_kernel_init=init('p'),
              proj_kernel_metadata={'tag': 'p'}) if layer is nr.LSTM else {}
  model = nnx.eval_shape(lambda: layer(
    3, 4, num_layers=2, bidirectional=True, kernel_metadata={'tag': 'k'},
    recurrent_kernel_metadata={'tag': 'r'}, bias_metadata={'tag': 'b'}, kernel_init=init('k'),
    recurrent_kernel_init=init('r'), bias_init=init('b'), rngs=nnx.Rngs(0), **proj))
  for cell in [*model.forward, *model.backward]:
    assert cell.dense_i.kernel.get_metadata()['tag'] == 'k'
    assert cell.dense_h.kernel.get_metadata()['tag'] == 'r'
    bias = cell.dense_h.bias if layer is nr.LSTM else cell.bias_hn
    assert bias.get_metadata()['tag'] == 'b'
    if layer is nr.LSTM:
      assert cell.proj.kernel.get_metadata()['tag'] == 'p'
  per_layer = (  # (tag, shape) per cell of layer 0 and 1 (in_features 3, then 2 directions)
    [('k', (3, 16)), ('r', (2, 16)), ('b', (16,)), ('p', (4, 2))],
    [('k', (4, 16)), ('r', (2, 16)), ('b', (16,)), ('p', (4, 2))]) if layer is nr.LSTM else (
    [('k', (3, 12)), ('b', (12,)), ('r', (4, 12)), ('b', (4,))],
    [('k', (8, 12)), ('b', (12,)), ('r', (4, 12)), ('b', (4,))])
  assert sorted(calls) == sorted(2 * (per_layer[0] + per_layer[1]))


def test_constructor_signatures_are_spelled_out():
  """help(), IDEs and typos see every option under the public class's name."""
  lstm = inspect.signature(nr.LSTM.__init__).parameters
  gru = inspect.signature(nr.GRU.__init__).parameters
  assert set(gru) - set(lstm) == {'use_bias_hn'}
  assert set(lstm) - set(gru) == {'proj_features', 'proj_kernel_init', 'proj_kernel_metadata'}
  for params in (lstm, gru):
    assert not [n for n in params if n.startswith('_')]
    assert not [p for p in params.values() if p.kind is p.VAR_KEYWORD]
  # What a layer passes to its cells defaults as the cells' own options do: its
  # default cells are those of nr.RNN over the default cell.
  for params, cell in ((lstm, nr.OptimizedLSTMCell), (gru, nr.GRUCell)):
    cells = inspect.signature(cell.__init__).parameters
    passed = set(params) & set(cells) - {'self', 'in_features', 'hidden_features', 'rngs',
                                         'dropout_rate'}  # the layer's: between layers
    assert {'kernel_init', 'recurrent_kernel_init', 'bias_init', 'dtype', 'param_dtype'} <= passed
    assert {n: params[n].default for n in passed} == {n: cells[n].default for n in passed}
  for layer in (nr.LSTM, nr.GRU):
    with pytest.raises(TypeError, match=rf'{layer.__name__}\.__init__\(\) got an unexpected '
                       'keyword .*foo'):
      layer(3, 4, foo=1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_scans_are_named_for_profiles(cls):
  """Profiles and HLO dumps name the work: the layers' forward and backward
  scans, nr.RNN's scan and the cells' steps (CONVENTIONS: named scopes)."""
  layer = build(lambda: cls(I, H, rngs=nnx.Rngs(0)))
  rnn = build(lambda: nr.RNN(nr.LSTMCell(I, H, rngs=nnx.Rngs(0))))
  x = jnp.ones((B, T, I))

  def names(module):
    graph, state = nnx.split(module)
    loss = lambda s: (nnx.merge(graph, s)(x, seq_lengths=jnp.array([T, 2, 0])) ** 2).sum()
    return jax.jit(jax.grad(loss)).lower(state).as_text(debug_info=True)

  text = names(layer)
  for scope in ('forward', 'backward'):
    assert f'nr.{cls.__name__}/{scope}' in text
  graph, state = nnx.split(layer)  # the forward without a gradient (its own scan) too
  primal = jax.jit(lambda s: nnx.merge(graph, s)(x)).lower(state).as_text(debug_info=True)
  assert f'nr.{cls.__name__}/forward' in primal
  text = names(rnn)
  assert 'nr.RNN/LSTMCell' in text and 'nr.LSTMCell/dot' in text
