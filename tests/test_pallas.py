"""The fused layers' Pallas kernels (``implementation='pallas'``), in interpret mode.

On the CPU the kernels run in Pallas' interpret mode: the same kernels a GPU
lowers through Triton, run as XLA code (slow to compile, so the shapes are
tiny and each test compiles once). Values and gradients (parameters, inputs,
initial carry) are checked against the XLA scans (``implementation='xla'``,
themselves tested against the generic ``RNN`` composition) and the values
against the float64 NumPy formulas of ``tests.reference``; packed sequences
and the LSTM projection against the generic ``RNN`` composition. Garbage at
padding: ``tests/test_fused_padding.py`` (and here with packed sequences).
Where a kernel could read past a buffer (the loads a step ahead, a loop over
chunks), the tests run under Pallas' checking interpreter
(``internal.checked_interpreter``), which raises on such a read where the plain
one clamps it.
"""

import contextlib
import functools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import nnx_recurrent as nr
from nnx_recurrent._fused import _pallas, _plans, internal
from tests import reference as ref
from tests.jaxprs import equations
from tests.test_fused import (
  LENGTHS,
  B,
  H,
  I,
  T,
  assert_trees_close,
  build,
  call,
  check_grads_of_vector,
  check_plans_against_generic,
  make,
  numpy_layers,
  random_carry,
  value_and_grads_of,
  values_and_grads,
  weighted_loss,
)
from tests.test_fused_packing import IDS


def run(m, x, c):
  return m(x, initial_carry=c, seq_lengths=LENGTHS, return_carry=True)


def with_implementation(layer, implementation):
  layer.implementation = implementation
  return layer


@functools.cache
def _values_and_grads_program(graphdef, settings, force_triton):
  """The jitted function of ``values_and_grads(layer, x, carry, run)`` for layers
  of ``graphdef`` (structure, sizes, implementation), traced with the Pallas
  ``settings`` and ``internal.triton_lowering``'s flag (jax keys its own cache on
  the matmul precision): one compilation for the tests whose layers differ in
  values only (the float16 and bfloat16 tests below)."""
  del force_triton  # a key only: read while tracing
  return jax.jit(functools.partial(value_and_grads_of, graphdef, run))


def shared_values_and_grads(layer, x, carry):
  """``values_and_grads(layer, x, carry, run)`` (``tests/test_fused.py``), its
  program compiled once per layer structure, Pallas settings and matmul
  precision (:func:`_values_and_grads_program`)."""
  graphdef, params = nnx.split(layer)
  with internal.pallas_settings() as settings:
    return _values_and_grads_program(graphdef, settings, _pallas._force_triton)(params, x, carry)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_matches_xla_and_numpy(cls):
  """A bidirectional layer, lengths 5, 2 and 0, a random initial carry,
  ``return_carry``: values and gradients against the XLA scans, values against
  NumPy; garbage at padding (NaN, inf, 1e30) changes no value and no gradient.
  One layer: a second runs the same kernels (the input projection is XLA's,
  outside them) on the first's outputs, zero at padding as checked here; the
  layers around the kernels are the scans' (two layers: ``tests/test_fused.py``).
  Under Pallas' checking interpreter (``internal.checked_interpreter``): no
  kernel reads outside a buffer (the loads a step ahead, both kernels', stop at
  the last step: the plain interpreter clamps such a read, a GPU reads past
  the sequence), and every output element is written (they start as NaN)."""
  layer = make(cls, 1, True, seed=31, implementation='pallas')
  x = ref.normal((B, T, I), seed=32)
  carry0 = random_carry(layer, seed=33)
  padding = np.arange(T)[None, :] >= LENGTHS[:, None]
  with internal.checked_interpreter():
    (out, _), = check_plans_against_generic(  # one compilation
      layer, x, carry0, ['default'], padding, seq_lengths=LENGTHS,
      reference=lambda m, x, c: run(with_implementation(m, 'xla'), x, c)).values()
  assert_trees_close(out, numpy_layers(layer, x, LENGTHS, carry0), atol=2e-5)
  assert not np.asarray(out[1][2]).any()  # the length-0 row: zero outputs, initial carry
  assert_trees_close(jax.tree_util.tree_map(lambda a: a[2], out[0]),
                     jax.tree_util.tree_map(lambda a: a[2], carry0), atol=0, rtol=0)


def test_directions_run_in_one_launch_unless_their_arrays_differ():
  """A bidirectional layer runs both directions in one kernel launch (a grid
  over the directions): one ``pallas_call`` in its program. If the directions'
  arrays differ (here the initial carry: float32 forward, bfloat16 backward)
  they run one after the other, each with its own carry, as the scans do."""
  def launches(layer, carry0):
    jaxpr = jax.make_jaxpr(lambda x, c: run(layer, x, c))(x, carry0)
    return str(jaxpr).count('pallas_call')

  layer = make(nr.GRU, 1, True, seed=41, implementation='pallas')
  x = ref.normal((B, T, I), seed=42)
  (fwd, bwd), = random_carry(layer, seed=43)
  assert launches(layer, ((fwd, bwd),)) == 1
  mixed = ((fwd, bwd.astype(jnp.bfloat16)),)
  assert launches(layer, mixed) == 2
  out, expected = call((layer, with_implementation(nnx.clone(layer), 'xla')), x,
                       run=lambda ms, x: [run(m, x, mixed) for m in ms])  # one compilation
  assert out[0][0][1].dtype == jnp.bfloat16
  assert_trees_close(out, expected, atol=1e-5)


# The GRU's packed sequences: in several column chunks, below.
@pytest.mark.parametrize('cls', [nr.LSTM])
def test_packed_sequences_and_projection(cls):
  """The kernels' per-step flags (``segment_ids``: a row's first segment
  starts from the initial carry, whose cotangent the backward kernel
  collects, each later segment from zeros) and, for the LSTM, the projection
  (``m W_hr`` forward, ``dh W_hr^T`` backward): one bidirectional layer,
  values and gradients against the generic composition, garbage at padding
  inert."""
  layer = make(cls, 1, True, seed=48, implementation='pallas',
               **(dict(proj_features=3) if cls is nr.LSTM else {}))
  x = ref.normal((B, IDS.shape[1], I), seed=49)
  carry0 = random_carry(layer, seed=50)
  check_plans_against_generic(layer, x, carry0, ['default'], padding=IDS == 0, segment_ids=IDS)


# The LSTM unprojected with lengths, projected with packed sequences (as written:
# test_matches_xla_and_numpy, test_packed_sequences_and_projection): the masks'
# code (_step_masks, _step_math.h_entering) is the layers' and the projection's
# alike, and the GRU takes both masks.
@pytest.mark.parametrize('cls,proj,masks', [(nr.LSTM, None, 'lengths'), (nr.LSTM, 3, 'packed'),
                                            (nr.GRU, None, 'lengths'), (nr.GRU, None, 'packed')])
def test_rebuilt_residuals(cls, proj, masks):
  """``PallasSettings.residuals='rebuilt'``: the training forward kernel writes the
  LSTM's ``c`` alone (the GRU's nothing) and XLA rebuilds the backward's residuals
  from the outputs, the inputs and ``h W_h`` over all steps. Values and gradients of
  a bidirectional layer against the generic composition, with lengths (0 and 1
  among them) or packed sequences (a later segment's first step from zeros, the
  row's first from the initial carry), the LSTM also projected; garbage at padding
  (NaN, inf, 1e30) changes nothing."""
  layer = make(cls, 1, True, seed=71, implementation='pallas',
               **({} if proj is None else dict(proj_features=proj)))
  if masks == 'packed':
    x, kw, padding = ref.normal((B, IDS.shape[1], I), seed=72), dict(segment_ids=IDS), IDS == 0
  else:
    x, kw = ref.normal((B, T, I), seed=72), dict(seq_lengths=np.array([5, 1, 0], np.int32))
    padding = np.arange(T)[None, :] >= kw['seq_lengths'][:, None]
  with internal.pallas_settings(residuals='rebuilt'):
    check_plans_against_generic(layer, x, random_carry(layer, seed=73), ['default'],
                                padding=padding, **kw)


def test_rebuilt_gate_grads_are_the_formulas_and_zero_at_invalid_steps():
  """``_step_math.rebuilt_gate_grads`` (the backward kernel's gate gradients
  rebuilt from its ``dc`` and ``dh``): the LSTM's and GRU's gate-gradient
  formulas in NumPy at valid steps, zeros at invalid ones, even where the
  residuals there are NaN."""
  from nnx_recurrent._fused import _step_math

  rng = np.random.default_rng(76)
  valid = np.array([[True, True], [True, False]])  # (time, batch)
  for cls, n_seeds in ((_step_math.LSTMMath, 2), (_step_math.GRUMath, 1)):
    res = rng.uniform(0.1, 0.9, size=(2, 2, 5, 3))
    res[~valid] = np.nan
    seeds = rng.normal(size=(2, 2, n_seeds, 3))
    got = np.asarray(_step_math.rebuilt_gate_grads(cls, jnp.asarray(res), jnp.asarray(seeds),
                                                    jnp.asarray(valid)))
    a, b, c, d, e = np.moveaxis(res, -2, 0)
    if n_seeds == 2:  # i, f, g, o, c_prev; dc, dh
      dc, dh = np.moveaxis(seeds, -2, 0)
      tc = np.tanh(b * e + a * c)
      dct = dc + dh * d * (1 - tc ** 2)
      want = [dct * c * a * (1 - a), dct * e * b * (1 - b), dct * a * (1 - c ** 2),
              dh * tc * d * (1 - d)]
    else:  # r, z, n, hn, h_prev; dh
      dh = seeds[..., 0, :]
      dan = dh * (1 - b) * (1 - c ** 2)
      want = [dan * d * a * (1 - a), dh * (e - c) * b * (1 - b), dan * a, dan]
    want = np.where(valid[..., None, None], np.stack(want, axis=-2), 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_rebuilt_residuals_follow_what_the_forward_saved():
  """The backward reads the residuals' form from what the forward saved, not from
  the settings when it is traced: a VJP taken with ``residuals='rebuilt'`` and
  applied outside it (and the other way round) still equals the scans' gradients."""
  layer = make(nr.GRU, 1, False, seed=74, implementation='pallas')
  x = ref.normal((B, T, I), seed=75)
  graphdef, params = nnx.split(layer)

  def forward(p, implementation):
    return with_implementation(nnx.merge(graphdef, p), implementation)(x, seq_lengths=LENGTHS)

  # Jitted, each traced (under the settings around it) by a new function: the outputs
  # and the VJP's function (a pytree, its residuals inside), then that function applied
  def vjp(implementation):
    return jax.jit(lambda p: jax.vjp(lambda p: forward(p, implementation), p))(params)

  def apply(pullback, y):
    return jax.jit(lambda pullback, y: pullback(jnp.ones_like(y)))(pullback, y)

  y, scans = vjp('xla')
  want = apply(scans, y)
  for inside, outside in (('rebuilt', 'written'), ('written', 'rebuilt')):
    with internal.pallas_settings(residuals=inside):
      _, kernels = vjp('pallas')
    with internal.pallas_settings(residuals=outside):
      assert_trees_close(apply(kernels, y), want)


def test_what_the_training_forward_kernel_writes_follows_the_residuals_setting():
  """Under a gradient the forward kernel writes, besides the outputs and the final
  carry, five residual tiles a step with ``residuals='written'`` (``(time, rows,
  5, Hp)``), the LSTM's ``c`` alone with ``'rebuilt'`` (``(time, rows, Hp)``) and
  the GRU nothing (its inference kernel). Read off the traced training step (the
  values of both forms are equal: ``test_rebuilt_residuals``), whose two kernels
  are named in a profile as ``docs/performance.md`` says (``nr.LSTM/pallas_forward``,
  ``nr.LSTM/pallas_backward``). A projected LSTM (40 to 20) pads ``c`` to 64
  columns and ``h`` and the outputs to 32 only (``Hp``, ``Pp``). Without a
  gradient the forward kernel writes no residuals."""
  x = jnp.ones((B, T, I))

  def forward_outputs(layer, residuals):
    graphdef, params = nnx.split(layer)
    with internal.pallas_settings(residuals=residuals):
      jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x))))(params)
    forward, backward = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == 'pallas_call']
    for e, scope in ((forward, 'pallas_forward'), (backward, 'pallas_backward')):
      assert str(e.source_info.name_stack).startswith(f'nr.{type(layer).__name__}/{scope}/')
    return [v.aval.shape for v in forward.outvars]

  for cls, residuals, written in ((nr.LSTM, 'written', [(T, 16, 5, 16)]),
                                  (nr.LSTM, 'rebuilt', [(T, 16, 16)]),
                                  (nr.GRU, 'written', [(T, 16, 5, 16)]), (nr.GRU, 'rebuilt', [])):
    carries = [(16, 16)] * (2 if cls is nr.LSTM else 1)  # (rows, Hp), LSTM (c, h)
    assert forward_outputs(make(cls, implementation='pallas'), residuals) == [
      (T, 16, 16), *carries, *written], (cls, residuals)
  projected = build(lambda: nr.LSTM(I, 40, proj_features=20, implementation='pallas',
                                    rngs=nnx.Rngs(0)))
  assert forward_outputs(projected, 'written') == [(T, 16, 32), (16, 64), (16, 32),
                                                   (T, 16, 5, 64)]
  inference, = [e for e in equations(jax.make_jaxpr(projected)(x).jaxpr)
                if e.primitive.name == 'pallas_call']
  assert [v.aval.shape for v in inference.outvars] == [(T, 16, 32), (16, 64), (16, 32)]


# The loads a step ahead (PallasSettings.prefetch, the default) in several chunks run
# in 'fma': they are the same code whichever products follow ('dot' or 'fma'), and
# the 'dot' products in several chunks run in 'unrolled' and 'rolled'.
@pytest.mark.parametrize('mode', ['unrolled', 'rolled', 'fma'])
@pytest.mark.parametrize('cls,masks', [(nr.LSTM, dict(seq_lengths=LENGTHS)),
                                        (nr.GRU, dict(segment_ids=IDS))])
def test_column_chunks_and_partly_held_weights(cls, masks, mode):
  """Hidden sizes of several column chunks (16 wide here, 64 on a GPU): the
  state as pieces, ``h W_h`` as a sum of tile products, ``h`` of another
  width than ``c`` (the LSTM projected, 40 to 20: 4 and 2 chunks, the last of
  ``c``'s all padding; the GRU's 20: 2 chunks, each ``h W_h`` a sum of two),
  and weight tiles partly held across steps and partly loaded at each step
  (the budget ends inside a gate's block); or ``rolled``, as from ``H = 512``
  on a GPU: a loop over the chunks (each piece of the state picked and put by
  the loop's index), no weight held; or ``fma``: the products as broadcast
  multiplies summed over the contraction (``PallasSettings.matmul``), one
  batch row a program (a grid over the rows, no padding to 16), and the
  kernels loading each step's inputs (every chunk's, every gate's: the
  forward's input projections, the backward's residuals and output
  cotangents) during the step before (``PallasSettings.prefetch``; off in the
  other two). Values and gradients against the
  generic composition (float32 sums in another order over 40 columns: to
  3e-5), lengths (0 and 1 among them) or packed sequences. One direction: the
  backward one runs the same kernels on each row reversed (both directions:
  the tests above). The rolled LSTM runs 32-wide chunks and a projection to
  12: ``c`` in two chunks 32 wide, ``h`` in one 16 wide, tiles of ``W_h`` and
  ``W_hr`` of two widths (16 x 32, 32 x 16), under Pallas' checking
  interpreter: no read outside a buffer by the loop's index (a read past the
  last chunk is clamped by the plain interpreter, and its piece put nowhere)."""
  two_widths = mode == 'rolled' and cls is nr.LSTM  # chunks of c and of h of two widths
  hidden, proj = (40, dict(proj_features=12 if two_widths else 20)) if cls is nr.LSTM \
    else (20, {})
  layer = build(lambda: cls(I, hidden, implementation='pallas', rngs=nnx.Rngs(51), **proj),
                seed=51)
  x = ref.normal((B, IDS.shape[1], I), seed=52)
  padding = IDS == 0 if 'segment_ids' in masks else np.arange(x.shape[1]) >= LENGTHS[:, None]
  fma = dict(matmul='fma', state_elements=16) if mode == 'fma' else {}
  # W_h's tiles: the LSTM's 4 gates x 2 x 4 (and W_hr's 4 x 2), the GRU's 3 x 2 x 2
  checked = internal.checked_interpreter() if two_widths else contextlib.nullcontext()
  with checked, internal.pallas_settings(chunk=32 if two_widths else 16,
                                         hold_bytes=5 * 16 * 16 * 4,  # 5 of 32 or 12 tiles
                                         unrolled_chunks=1 if mode == 'rolled' else 4,
                                         prefetch=mode == 'fma', **fma):
    if fma:
      assert internal.pallas_padded_rows(B, hidden) == B
    check_plans_against_generic(layer, x, random_carry(layer, seed=53), ['default'],
                                padding=padding, tol=3e-5, **masks)


def test_weight_tiles_are_held_across_steps_up_to_hold_bytes_and_loaded_at_each_step_beyond():
  """``PallasSettings.hold_bytes``: each kernel loads the first weight tiles
  that fit the budget once, before its time loop, and loads the others at
  each step (one load per use); the budget is shared by ``W_h`` and the
  projection's ``W_hr``, in that order. Read off the kernels' programs (the
  values are the same either way: above): an LSTM of hidden 40 projected to 12
  in 32-wide chunks (``h``'s one chunk 16 wide) has 8 tiles of ``W_h`` (4 gates
  x 1 x 2, each 16 x 32) and 2 of ``W_hr`` (32 x 16); a budget of exactly 9
  tiles holds all of ``W_h`` and one of ``W_hr``, in the forward kernel and in
  the backward (``W_h^T``, ``W_hr^T``)."""
  layer = build(lambda: nr.LSTM(I, 40, proj_features=12, implementation='pallas',
                                rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(layer)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(jnp.ones((B, T, I))))

  with internal.pallas_settings(chunk=32, hold_bytes=9 * 16 * 32 * 4):
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  loads = {}
  for kernel_call in [e for e in equations(jaxpr) if e.primitive.name == 'pallas_call']:
    kernel = kernel_call.params['jaxpr']
    name = kernel_call.params['name']  # W_h, W_hr after the steps (and residuals, d ys)
    weights = kernel.invars[2:4] if name.endswith('forward') else kernel.invars[3:5]
    loop, = [e for e in kernel.eqns if e.primitive.name == 'scan']  # the time loop
    body = loop.params['jaxpr'].jaxpr
    for weight, label in zip(weights, ('W_h', 'W_hr')):
      inside = [v for v, outer in zip(body.invars, loop.invars) if outer is weight]
      loads[name, label] = (
        sum(e.primitive.name == 'get' and e.invars[0] is weight for e in kernel.eqns),
        sum(e.primitive.name == 'get' and e.invars[0] in inside for e in equations(body)))
  # (loaded before the loop, loaded in the loop's body)
  assert loads == {(f'nr_lstm_{kernel}', label): count
                   for kernel in ('forward', 'backward')
                   for label, count in (('W_h', (8, 0)), ('W_hr', (1, 1)))}


def test_pallas_settings_yield_the_changes_and_nest():
  default = internal.PallasSettings()
  # the defaults _pallas_settings.Settings documents (measured on an H200; Triton's limits)
  assert default._asdict() == dict(
    chunk=64, hold_bytes=176 * 1024, state_elements=4096, unrolled_chunks=4, num_warps=8,
    num_stages=1, matmul='dot', prefetch=True, recurrent_weights='float32', residuals='written')
  with internal.pallas_settings(chunk=16) as outer:
    assert outer == default._replace(chunk=16)
    with internal.pallas_settings(num_warps=2) as inner:
      assert inner == outer._replace(num_warps=2)
    with internal.pallas_settings() as now:
      assert now == outer
  with internal.pallas_settings() as now:
    assert now == default
  with pytest.raises(ZeroDivisionError), internal.pallas_settings(chunk=32):
    1 / 0
  with internal.pallas_settings() as now:  # restored when left by an exception too
    assert now == default
  with pytest.raises(ValueError, match=re.escape(
      "pallas_settings: matmul must be one of ('dot', 'fma', 'auto'), got 'wgmma'")), \
       internal.pallas_settings(matmul='wgmma'):
    pass
  with pytest.raises(ValueError, match=re.escape(
      "pallas_settings: recurrent_weights must be one of ('float32', 'float16'), got "
      "'bfloat16'")), internal.pallas_settings(recurrent_weights='bfloat16'):
    pass
  with pytest.raises(ValueError, match=re.escape(
      "pallas_settings: residuals must be one of ('written', 'rebuilt'), got 'none'")), \
       internal.pallas_settings(residuals='none'):
    pass


def _power_at_or_below(a):
  """The power of two at or below each entry of ``a >= 0`` (1 for 0), in NumPy."""
  a = np.asarray(a, np.float64)
  return np.where(a > 0, 2.0 ** np.floor(np.log2(np.where(a > 0, a, 1.0))), 1.0)


def _float16_rounded(a, axis):
  """``a`` rounded to float16 after dividing it (each slice along ``axis``; all of
  it for ``None``) by the power of two at or below its largest magnitude, then
  multiplied back."""
  scale = _power_at_or_below(np.abs(np.asarray(a, np.float64)).max(axis=axis, keepdims=True))
  return np.asarray(a / scale, np.float16).astype(np.float64) * scale


class _Float16Product:
  """A recurrent weight matrix for ``tests.reference``: ``h @ W`` with ``h`` and ``W``
  rounded to float16 first, the product in float64. ``W`` (one gate's block) is
  scaled into float16's range first, and with ``rows_scaled`` (an initial carry
  beyond that range) ``h``'s rows too, at every step."""
  __array_ufunc__ = None  # NumPy defers ``h @ self`` to __rmatmul__

  def __init__(self, w, rows_scaled: bool):
    self.w, self.rows_scaled = _float16_rounded(w, None), rows_scaled

  def __rmatmul__(self, h):
    if self.rows_scaled:
      return _float16_rounded(h, -1) @ self.w
    return np.asarray(h, np.float16).astype(np.float64) @ self.w


def _numpy_float16_products(layer, x, carry0, rows_scaled=False):
  """``numpy_layers`` with every recurrent product's operands rounded to float16."""
  out = []
  for cell, c0, reverse in ((layer.forward[0], carry0[0][0], False),
                            (layer.backward[0], carry0[0][1], True)):
    p = ref.cell_params(cell)
    for name in [k for k in p if k.startswith('W_h') and (p['kind'] == 'gru' or k != 'W_hr')]:
      p[name] = _Float16Product(p[name], rows_scaled)
    out.append(ref.rnn(p, x, LENGTHS, c0, num_batch_dims=1, reverse=reverse, keep_order=True))
  return ((out[0][0], out[1][0]),), np.concatenate([out[0][1], out[1][1]], axis=-1)


def _float16_weights(cls):
  """The float16 weights' settings in the two tests below, which share their
  compiled programs: the LSTM's products as multiply-adds (``matmul='fma'``,
  whose operands round as the ``dot``'s do), the GRU's as ``dot``s."""
  return internal.pallas_settings(recurrent_weights='float16',
                                  matmul='fma' if cls is nr.LSTM else 'dot')


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_float16_recurrent_weights(cls):
  """``PallasSettings.recurrent_weights='float16'``: the forward kernel's products
  ``h W_h`` take ``h`` and ``W_h`` rounded to float16 (TF32's mantissa), at TF32
  precision: values against float64 NumPy with the same rounding (and
  further from NumPy without it), lengths 5, 2 and 0, a random carry, both
  directions (the LSTM's products as multiply-adds: ``_float16_weights``);
  gradients against the float32 scans at the rounding's tolerance
  (the backward kernel's products ``dgates W_h^T`` in float16 too, each row
  scaled into its range: see below). At ``'highest'`` precision,
  unset on the CPU (where that means float32), or with a projection, the
  weights stay float32."""
  hidden = 24  # three float16 roundings a row of h W_h; larger sums than H = 4
  layer = build(lambda: cls(I, hidden, bidirectional=True, implementation='pallas',
                            rngs=nnx.Rngs(61)), seed=61)
  x = ref.normal((B, T, I), seed=62)
  carry0 = random_carry(layer, seed=63)
  with _float16_weights(cls):
    # gpu.sh runs the tests at 'highest'; TF32 is the default on a GPU (where the input
    # projections then round to TF32 too: a looser tolerance there)
    with jax.default_matmul_precision('tensorfloat32'):
      out, grads = shared_values_and_grads(layer, x, carry0)
    with jax.default_matmul_precision('highest'):
      full, _ = shared_values_and_grads(layer, x, carry0)
  rounded = _numpy_float16_products(layer, x, carry0)
  exact = numpy_layers(layer, x, LENGTHS, carry0)
  cpu = jax.default_backend() == 'cpu'
  assert_trees_close(out, rounded, atol=2e-6 if cpu else 5e-3)
  if cpu:
    assert max(np.abs(np.asarray(a) - b).max() for a, b in zip(
      jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(exact))) > 1e-4
    with internal.pallas_settings(recurrent_weights='float16'):  # unset: float32 on a CPU
      unset, _ = shared_values_and_grads(layer, x, carry0)
    assert_trees_close(unset, exact, atol=2e-5)
  assert_trees_close(full, exact, atol=2e-5)
  _, grads_f = shared_values_and_grads(with_implementation(layer, 'xla'), x, carry0)
  assert_trees_close(grads, grads_f, atol=5e-3, rtol=5e-3)
  if cls is nr.LSTM:
    projected = make(cls, 1, True, seed=64, implementation='pallas', proj_features=3)
    carry_p = random_carry(projected, seed=65)
    with internal.pallas_settings(recurrent_weights='float16'), \
         jax.default_matmul_precision('tensorfloat32'):  # the projection alone keeps float32
      out_p, _ = shared_values_and_grads(projected, x, carry_p)
    assert_trees_close(out_p, numpy_layers(projected, x, LENGTHS, carry_p),
                       atol=2e-5 if cpu else 5e-3)


@pytest.mark.parametrize('case', ['huge weights', 'tiny weights, huge carry',
                                  'gates apart, negative carry'])
@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_float16_recurrent_weights_beyond_float16s_range(cls, case):
  """The float16 weights hold any float32 weights and initial carry: each gate's
  block of ``W_h`` is scaled into float16's range (by a power of two), and where the
  initial carry exceeds it (65504) so are ``h``'s rows, at every step of that
  kernel program. Weights times 2**17 (over 65504) or times 2**-20 (float16
  subnormals) with ``h`` times 2**20 (an LSTM's ``c`` not); or each gate's block times its own power
  of two (2**-18, 2**-17, ..., the last gate's 2**14 further up: with one scale for
  all gates, the first gates' blocks would be float16 subnormals, rounded to a
  few bits, and the values fail) with every carry entry in
  -65536..-65520 (beyond 65504 by less than float16's last step, and below zero
  only): values against float64 NumPy with the
  same rounding, bidirectional, lengths 5, 2 and 0; gradients against the
  float32 scans, each leaf to 5e-3 of its largest magnitude (an LSTM's ``h``
  reaches the loss only through ``h W_h``: its gradient takes the backward's
  scaled products alone)."""
  layer = build(lambda: cls(I, 24, bidirectional=True, implementation='pallas',
                            rngs=nnx.Rngs(71)), seed=71)
  x = ref.normal((B, T, I), seed=72)
  carry0 = random_carry(layer, seed=73)
  if case == 'gates apart, negative carry':
    for cell in (layer.forward[0], layer.backward[0]):
      kernel = np.asarray(cell.dense_h.kernel[...])
      gates = kernel.shape[1] // 24
      cell.dense_h.kernel[...] = jnp.asarray(kernel * np.repeat(
        2.0 ** (np.arange(gates) - 18 + 14 * (np.arange(gates) == gates - 1)), 24), kernel.dtype)
    carry0 = jax.tree_util.tree_map(
      lambda a: -65520.0 - 16 * jnp.abs(jnp.tanh(a)), carry0)
    carry = 65536.0
  else:
    weights, carry = (2.0 ** 17, 1.0) if case == 'huge weights' else (2.0 ** -20, 2.0 ** 20)
    for cell in (layer.forward[0], layer.backward[0]):
      cell.dense_h.kernel[...] = cell.dense_h.kernel[...] * weights
    # h times 2**20, an LSTM's c not (the kernels judge h's range by h, not by c)
    carry0 = tuple(tuple((c[0], c[1] * carry) if cls is nr.LSTM else c * carry for c in both)
                   for both in carry0)
  with _float16_weights(cls), jax.default_matmul_precision('tensorfloat32'):
    out, grads = shared_values_and_grads(layer, x, carry0)
  with np.errstate(over='ignore'):  # the huge weights' sigmoids: exp overflows to 1 / inf = 0
    want = _numpy_float16_products(layer, x, carry0, rows_scaled=carry > 1)
  # on a GPU the input projections round to TF32 too (see above)
  tolerance = 2e-6 if jax.default_backend() == 'cpu' else 5e-3
  assert_trees_close(out, want, atol=tolerance, rtol=tolerance)
  _, full = shared_values_and_grads(with_implementation(layer, 'xla'), x, carry0)
  leaves, structure = jax.tree_util.tree_flatten_with_path(grads)
  assert jax.tree_util.tree_structure(full) == structure
  for (path, got), want in zip(leaves, jax.tree_util.tree_leaves(full)):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                               atol=5e-3 * np.abs(want).max() + 1e-30,
                               err_msg=jax.tree_util.keystr(path))


def test_float16_recurrent_weights_only_where_the_layer_computes_in_float32():
  """``recurrent_weights='float16'`` at a matmul precision of TF32 or less
  (``'tensorfloat32'``, ``'bfloat16'``, ``'default'``): a float32
  layer's training step holds float16 arrays (the weights, the products'
  operands), a bfloat16 layer's none (its weights keep their dtype). Read off
  the traced step (the values: the tests above)."""
  x = jnp.ones((B, T, I))

  def float16_arrays(dtype, precision):
    graphdef, params = nnx.split(make(nr.GRU, implementation='pallas', dtype=dtype))

    def loss(p):
      return jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32))

    with internal.pallas_settings(recurrent_weights='float16'), \
         jax.default_matmul_precision(precision):
      return len(re.findall(r'(?<![b\w])f16\[', str(jax.make_jaxpr(jax.grad(loss))(params))))

  for precision in ('tensorfloat32', 'bfloat16', 'default'):
    assert float16_arrays(jnp.float32, precision) > 0, precision
  assert float16_arrays(jnp.bfloat16, 'tensorfloat32') == 0


def test_float16_recurrent_weights_lower_as_float16_products():
  """Lowered for CUDA (Triton IR): with ``recurrent_weights='float16'`` both
  kernels' ``dot``s take float16 operands; without it neither kernel has any."""
  from benchmarks import triton_resources

  with internal.pallas_settings(recurrent_weights='float16'):
    half = triton_resources.triton_ir('GRU', 2, 3, 16, 'float32', None, False)
  plain = triton_resources.triton_ir('GRU', 2, 3, 16, 'float32', None, False)
  for kernel in ('forward', 'backward'):
    assert re.search(r'tt\.dot %\S+, %\S+, %\S+.*tensor<16x16xf16>', half[kernel]), kernel
    assert 'xf16>' not in plain[kernel], kernel


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_float16_backward_products_hold_gradients_of_any_size(cls):
  """The backward kernel's float16 products ``dgates W_h^T`` scale each row of
  the gate gradients by a power of two into float16's range and the products
  back: a loss multiplied by 1e-12 or 1e12 (whose gate gradients, unscaled,
  would flush to zero or overflow float16's 65504) has the gradients of the
  float32 scans times the same factor, to the rounding's tolerance."""
  layer = build(lambda: cls(I, 24, implementation='pallas', rngs=nnx.Rngs(66)), seed=66)
  x = ref.normal((B, T, I), seed=67)
  graphdef, params = nnx.split(layer)

  @jax.jit
  def grads(params, factor):
    def loss(p, implementation):
      m = with_implementation(nnx.merge(graphdef, p), implementation)
      return weighted_loss(m(x, seq_lengths=LENGTHS)) * factor
    return jax.grad(loss)(params, 'pallas'), jax.grad(loss)(params, 'xla')

  for factor in (1e-12, 1.0, 1e12):
    with internal.pallas_settings(recurrent_weights='float16'), \
         jax.default_matmul_precision('tensorfloat32'):
      half, full = grads(params, factor)
    scaled = jax.tree_util.tree_map(lambda a, f=factor: np.asarray(a, np.float64) / f, (half, full))
    assert_trees_close(*scaled, atol=5e-3, rtol=5e-3)
    assert all(np.abs(a).max() > 1e-2 for a in jax.tree_util.tree_leaves(scaled[0]))


def test_float16_weights_in_a_loop_over_chunks_with_packed_sequences():
  """The float16 weights where the kernels loop over column chunks (as from
  hidden 512 on a GPU: tiles loaded at a traced index, each row's scale taken
  chunk by chunk in the backward), with packed sequences: values and gradients
  of a bidirectional GRU against the float32 scans at the rounding's tolerance."""
  layer = build(lambda: nr.GRU(I, 40, bidirectional=True, implementation='pallas',
                               rngs=nnx.Rngs(68)), seed=68)
  x = ref.normal((B, IDS.shape[1], I), seed=69)
  carry0 = random_carry(layer, seed=70)

  def packed(m, x, c):
    return m(x, initial_carry=c, segment_ids=IDS, return_carry=True)

  with internal.pallas_settings(chunk=16, unrolled_chunks=1, recurrent_weights='float16'), \
       jax.default_matmul_precision('tensorfloat32'):
    half = values_and_grads(layer, x, carry0, packed)
  full = values_and_grads(with_implementation(layer, 'xla'), x, carry0, packed)
  assert_trees_close(half, full, atol=1e-2, rtol=1e-2)


def test_row_scale_is_each_rows_power_of_two():
  """``_float16.row_scale``: the power of two at or below each row's largest magnitude
  over the pieces (exact, so dividing by it loses nothing), 1 for a zero row."""
  from nnx_recurrent._fused import _float16

  a = jnp.array([[3.0, -0.5], [0.0, 0.0], [1e-30, 0.0], [-7e20, 1.0]], jnp.float32)
  b = jnp.array([[-5.0, 0.0], [0.0, 0.0], [0.0, -3e-30], [0.0, 0.0]], jnp.float32)
  got = np.asarray(_float16.row_scale([a, b]))[:, 0]
  want = [4.0, 1.0, 2.0 ** np.floor(np.log2(3e-30)), 2.0 ** np.floor(np.log2(7e20))]
  np.testing.assert_array_equal(got, np.float32(want))
  assert np.all(np.abs(np.asarray(jnp.concatenate([a, b], 1)) / got[:, None]) < 2)


@pytest.mark.parametrize('residuals', ['written', 'rebuilt'])
@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_bfloat16_computation(cls, residuals):
  """bfloat16 matmuls and residuals (float32 state in the kernel; or the residuals
  rebuilt by XLA from the bfloat16 outputs) against the float32 XLA scans: values
  and gradients, at bfloat16's tolerance. The initial carry in float32 or (with
  the residuals rebuilt: either carry dtype goes with either form) in bfloat16:
  the final carry and the carry's gradient in its dtype."""
  layer = make(cls, 1, False, seed=34, implementation='pallas', dtype=jnp.bfloat16)
  full = make(cls, 1, False, seed=34, implementation='xla')
  x = ref.normal((B, T, I), seed=35)
  carry_dtype = jnp.dtype(jnp.float32 if residuals == 'written' else jnp.bfloat16)
  carry0 = jax.tree_util.tree_map(lambda a: a.astype(carry_dtype), random_carry(layer, seed=36))
  with internal.pallas_settings(residuals=residuals):
    out, grads = shared_values_and_grads(layer, x, carry0)
  assert out[1].dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree_util.tree_leaves((out[0], grads[2]))} == {carry_dtype}
  # The final carry is the computation dtype's, rounded (as the scans' bfloat16 carry is).
  final = np.asarray(out[0], np.float32)
  np.testing.assert_array_equal(final, final.astype(jnp.bfloat16).astype(np.float32))
  out_f, grads_f = shared_values_and_grads(full, x, carry0)
  out = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), out)
  grads = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), grads)
  assert_trees_close(out, out_f, atol=3e-2, rtol=3e-2)
  assert_trees_close(grads, grads_f, atol=1e-1, rtol=5e-2)


def test_bfloat16_state_stays_float32_in_the_kernel():
  """docs/performance.md: with ``dtype=bfloat16`` the kernels hold ``c`` and
  ``h`` in float32 between steps, the XLA scans in bfloat16. An LSTM whose
  gates are its biases (zero weights) adds ``i * g`` (about 0.002) to
  ``c = 1`` at each step, less than half of bfloat16's spacing at 1: in
  float32 the sum grows (NumPy), in bfloat16 it rounds back to 1 every step."""
  layer = build(lambda: nr.LSTM(I, H, dtype=jnp.bfloat16, implementation='pallas',
                                rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(layer)
  bias = np.repeat(np.array([10.0, 10.0, 0.002, 0.0], np.float32), H)  # gates i, f, g, o
  params = jax.tree_util.tree_map_with_path(
    lambda path, a: jnp.asarray(bias) if 'bias' in jax.tree_util.keystr(path)
    else jnp.zeros_like(a), params)
  carry0 = (jnp.ones((B, H)), jnp.zeros((B, H)))  # (c, h)
  x = ref.normal((B, T, I), seed=37)

  @jax.jit
  def final_c(params):
    def run(implementation):
      m = with_implementation(nnx.merge(graphdef, params), implementation)
      return m(x, initial_carry=carry0, return_carry=True)[0][0]
    return run('pallas'), run('xla')

  pallas, scans = final_c(params)
  b = bias.astype(jnp.bfloat16).astype(np.float64)  # rounded or not: the same bfloat16 carry
  i, f, g = 1 / (1 + np.exp(-b[0])), 1 / (1 + np.exp(-b[H])), np.tanh(b[2 * H])
  c = 1.0
  for _ in range(T):
    c = f * c + i * g
  assert c > 1.008  # the float32 sum is at least one bfloat16 step above 1
  np.testing.assert_array_equal(np.asarray(pallas), np.float32(np.float32(c).astype(jnp.bfloat16)))
  np.testing.assert_array_equal(np.asarray(scans), 1.0)


@pytest.mark.parametrize('cls', [nr.LSTM])  # the GRU's VJP: against the XLA scans above
def test_check_grads_float64(cls):
  """Finite differences of the kernels' hand-written VJP, in float64 (both
  directions, lengths 3 and 1, a non-zero initial carry)."""
  with jax.enable_x64(True):
    layer = build(lambda: cls(2, 3, bidirectional=True, param_dtype=jnp.float64,
                              implementation='pallas', rngs=nnx.Rngs(0)))
    x = np.random.default_rng(0).standard_normal((2, 3, 2))
    carry0 = jax.tree_util.tree_map(lambda a: np.full(a.shape, 0.3, a.dtype),
                                    jax.eval_shape(lambda: layer._default_carry((2,))))
    check_grads_of_vector(layer, x, carry0, jnp.array([3, 1]))


def test_batch_blocks_and_batch_axes():
  """More rows than one program takes (a grid of batch blocks, padded rows),
  two batch axes, time-major, one direction, the forward without a gradient,
  the recurrent weights loaded at each step (as for large hidden sizes)."""
  layer = make(nr.GRU, 1, False, seed=37, implementation='pallas', time_major=True)
  x = ref.normal((T, 2, 40, I), seed=38)
  lengths = jnp.asarray(np.random.default_rng(39).integers(0, T + 1, (2, 40)))
  carry = random_carry(layer, (2, 40), seed=40)
  kw = dict(initial_carry=carry, seq_lengths=lengths, return_carry=True)

  def both(m, x):  # one compilation: the kernels (traced with the settings) and the scans
    with internal.pallas_settings(hold_bytes=0):
      out = m(x, **kw)
    return out, with_implementation(m, 'xla')(x, **kw)

  out, want = call(layer, x, run=both)
  assert_trees_close(out, want)


@pytest.mark.parametrize('cls,dtype,weights,packed,gpu,matmul', [
  (nr.GRU, jnp.float32, 'held', False, True, 'dot'),
  (nr.LSTM, jnp.float32, 'loaded', True, False, 'dot'),
  (nr.LSTM, jnp.bfloat16, 'rolled', True, False, 'dot'),  # the loop's state pieces: float32
  (nr.LSTM, jnp.float32, 'held', False, False, 'fma')])
def test_kernels_lower_through_triton(cls, dtype, weights, packed, gpu, matmul, monkeypatch):
  """Without a GPU: the training step exported for CUDA holds the kernels
  (forward with residuals, backward) as Triton calls, one each for both
  directions (a grid over the directions and the batch blocks), so the
  Triton lowering of Pallas accepts them (block shapes, dots, loads and stores
  of column chunks and weight tiles; Triton's own compiler is not reached
  here: ``benchmarks/triton_resources.py``). The recurrent weights held in the
  kernel across steps, or loaded at each step, or a loop over the column
  chunks (as from ``H = 512`` on); lengths, or packed sequences' flags (and
  then the LSTM projected). Told to (``internal.triton_lowering``), or (``gpu``)
  where jax's default backend is a GPU, and then with the next step's input
  projections loaded ahead (``PallasSettings.prefetch``). With
  ``matmul='fma'`` the products are broadcast multiplies and sums, no ``dot``,
  and each program has one batch row."""
  proj = dict(proj_features=24) if packed and cls is nr.LSTM else {}
  layer = build(lambda: cls(I, 64, bidirectional=True, implementation='pallas', dtype=dtype,
                            rngs=nnx.Rngs(0), **proj))
  graphdef, params = nnx.split(layer)
  masks = dict(segment_ids=jnp.array([[1, 1, 2, 2, 0], [1, 0, 0, 0, 0], [0] * T])) if packed \
    else dict(seq_lengths=jnp.array([T, 1, 0]))

  def loss(params, x):
    y = nnx.merge(graphdef, params)(x, **masks)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  triton = '__gpu$xla.gpu.triton'
  unchecked = [export.DisabledSafetyCheck.custom_call(triton)]
  x = jnp.ones((B, T, I))  # outside: no eager computation under jax 0.11's abstract GPU
  sizes = dict(chunk=32, hold_bytes=2**30 if weights == 'held' else 0,
               unrolled_chunks=1 if weights == 'rolled' else 4, prefetch=gpu, matmul=matmul,
               state_elements=32 if matmul == 'fma' else 4096)  # fma: one row a program
  if gpu:
    lowering = internal._abstract_gpu()  # made while the CPU is the default backend
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  else:
    lowering = internal.triton_lowering()
  with lowering, internal.pallas_settings(**sizes):
    exported = export.export(jax.jit(jax.grad(loss)), platforms=['cuda'],
                             disabled_checks=unchecked)(params, x)
  calls = re.findall(r'stablehlo\.custom_call @([^(]+)\(.*grid_x = (\d+) : i32, grid_y = '
                     r'(\d+) : i32.*name = "(nr_\w+)"', exported.mlir_module())
  name = cls.__name__.lower()
  # One launch per pass for both directions: a grid of (batch blocks, directions);
  # one block of 16 rows, or with the multiply-adds one block a row.
  blocks = str(B) if matmul == 'fma' else '1'
  assert sorted(calls) == [(triton, blocks, '2', f'nr_{name}_backward'),
                           (triton, blocks, '2', f'nr_{name}_forward')]


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_kernels_placed_on_the_cpu_of_a_gpu_machine_run_interpreted(cls, monkeypatch):
  """jax's default backend a GPU, the computation lowered for the CPU (as under
  ``jax.default_device(cpu)`` or with CPU-committed arguments on a GPU
  machine): the kernels run interpreted there, values and gradients, where
  the kernels lowered for Triton failed ("Only interpret mode is supported on
  CPU backend"); the program exported for CUDA holds Triton calls only."""
  layer = make(cls, 1, True, seed=41, implementation='pallas')
  x = ref.normal((B, T, I), seed=42)
  carry0 = random_carry(layer, seed=43)
  graphdef, params = nnx.split(layer)

  def loss(params, x):
    carry, y = run(nnx.merge(graphdef, params), x, carry0)
    return jnp.sum(y ** 2) + sum(jnp.sum(c) for c in jax.tree_util.tree_leaves(carry))

  want = jax.value_and_grad(loss)(params, x)  # interpreted: the CPU is the default backend
  abstract_gpu = internal._abstract_gpu()  # made while the CPU is the default backend
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with jax.default_device(jax.devices('cpu')[0]):
    out = jax.jit(lambda p, x: run(nnx.merge(graphdef, p), x, carry0))(params, x)
    got = jax.jit(jax.value_and_grad(loss))(params, x)
  assert_trees_close(out, numpy_layers(layer, x, LENGTHS, carry0), atol=2e-5)
  assert_trees_close(got, want, atol=1e-5)
  triton = '__gpu$xla.gpu.triton'
  with abstract_gpu:
    exported = export.export(jax.jit(jax.grad(loss)), platforms=['cuda'], disabled_checks=[
      export.DisabledSafetyCheck.custom_call(triton)])(params, x)
  calls = re.findall(r'stablehlo\.custom_call @([^(]+)\(.*name = "(nr_\w+)"',
                     exported.mlir_module())
  name = cls.__name__.lower()
  assert sorted(calls) == [(triton, f'nr_{name}_backward'), (triton, f'nr_{name}_forward')]


def test_matmul_auto_takes_the_multiply_adds_up_to_64_columns():
  """``matmul='auto'``: the multiply-adds where ``W_h``'s gate blocks are at
  most 64 wide, one batch row a program, in one warp up to 32 columns and two
  up to 64 (whatever ``state_elements`` and ``num_warps`` say); beyond, the
  ``dot`` with its 16-row blocks and the settings' warps (and either way the
  settings' ``num_stages``). Read off the
  training step exported for CUDA: a block of one row lowers only without a
  ``dot`` (Triton's needs 16 rows)."""
  def launches(hidden, **proj):
    layer = build(lambda: nr.LSTM(I, hidden, implementation='pallas', rngs=nnx.Rngs(0), **proj))
    graphdef, params = nnx.split(layer)

    def loss(params, x):
      return jnp.sum(nnx.merge(graphdef, params)(x, seq_lengths=LENGTHS) ** 2)

    unchecked = [export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
    x = jnp.ones((B, T, I))  # outside: no eager computation under jax 0.11's abstract GPU
    with internal.triton_lowering():
      exported = export.export(jax.jit(jax.grad(loss)), platforms=['cuda'],
                               disabled_checks=unchecked)(params, x)
    return sorted(re.findall(r'grid_x = (\d+) : i32.*num_stages = 2 : i32, num_warps = (\d+) : i32',
                             exported.mlir_module()))

  # num_stages: the setting's, in every call
  with internal.pallas_settings(matmul='auto', state_elements=4096, num_warps=4, num_stages=2):
    assert [internal.pallas_padded_rows(B, h) for h in (32, 64, 128)] == [B, B, 16]
    assert launches(32) == [(str(B), '1')] * 2  # forward and backward kernels
    assert launches(64) == [(str(B), '2')] * 2
    assert launches(128) == [('1', '4')] * 2
    assert launches(64, proj_features=100) == [('1', '4')] * 2  # h 100 wide: Pp = 128


@pytest.mark.parametrize('cls', [nr.GRU])  # one table for both layers: the other's row below
def test_auto_picks_pallas_only_where_measured_faster(cls, monkeypatch):
  """The one table (``_plans.PALLAS_FASTER``, replaced here by a test region); a
  region's rows are those of all batch axes, bounds included; only on a CUDA
  GPU whose device kind names the region's device, and not under
  ``jax.default_device(cpu)``."""
  def uses_pallas(layer, x=jnp.ones((B, T, I))):
    return 'pallas_call' in str(jax.make_jaxpr(lambda x: layer(x))(x))

  assert uses_pallas(make(cls, implementation='pallas'))
  assert not uses_pallas(make(cls))  # 'auto'
  monkeypatch.setattr(_plans, 'cuda_backend', lambda: True)  # as on a GPU
  assert not uses_pallas(make(cls))
  region = _plans.PallasRegion(cls.__name__, rows=(B, B), hidden=(H, H), device='')
  monkeypatch.setattr(_plans, 'PALLAS_FASTER', (region,))
  assert uses_pallas(make(cls))
  with jax.default_device(jax.devices('cpu')[0]):  # placed on a GPU machine's CPU: the scans
    assert not uses_pallas(make(cls))
  with monkeypatch.context() as patch:  # a jax without Pallas' Triton: the scans, no error
    patch.setattr(_pallas, 'unsupported', lambda: "lowers through Pallas' Triton backend, ...")
    assert not uses_pallas(make(cls))
  assert uses_pallas(make(cls), jnp.ones((1, B, T, I)))  # B rows over two batch axes
  assert not uses_pallas(make(cls), jnp.ones((B, 2, T, I)))
  assert not uses_pallas(make(cls, implementation='xla'))
  assert not uses_pallas(build(lambda: cls(I, 2 * H, rngs=nnx.Rngs(0))))  # outside the region
  assert not uses_pallas(build(lambda: cls(I, H // 2, rngs=nnx.Rngs(0))))  # below it
  assert not uses_pallas(make(cls), jnp.ones((B - 1, T, I)))
  projected = build(lambda: nr.LSTM(I, H, proj_features=H // 2, rngs=nnx.Rngs(0)))
  monkeypatch.setattr(_plans, 'PALLAS_FASTER', (region._replace(layer='LSTM'),))
  assert uses_pallas(projected)  # the region's hidden is hidden_features, not proj_features
  monkeypatch.setattr(_plans, 'PALLAS_FASTER', (region,))
  # A symbolic batch (jax.export) has no measured rows: the scans, traced only;
  # nor a symbolic time size, nor shard_map with check_vma=True, where an
  # explicit 'pallas' is refused (their errors: below): the scans, not an error.
  graphdef, state = nnx.split(make(cls))
  for shape in (f'b, {T}, {I}', f'{B}, t, {I}'):
    symbolic = jax.ShapeDtypeStruct(export.symbolic_shape(shape), jnp.float32)
    assert 'pallas_call' not in str(jax.make_jaxpr(
      lambda s, x: nnx.merge(graphdef, s)(x))(state, symbolic))
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  sharded = jax.shard_map(lambda s, x: nnx.merge(graphdef, s)(x),
                          mesh=Mesh(np.array(jax.devices()[:1]), ('data',)),
                          in_specs=(P(), P('data')), out_specs=P('data'))
  assert 'pallas_call' not in str(jax.make_jaxpr(sharded)(state, jnp.ones((B, T, I))))
  other = 'GRU' if cls is nr.LSTM else 'LSTM'
  monkeypatch.setattr(_plans, 'PALLAS_FASTER', (region._replace(layer=other),))
  assert not uses_pallas(make(cls))
  monkeypatch.setattr(_plans, 'PALLAS_FASTER', (region._replace(device='no such device'),))
  assert not uses_pallas(make(cls))
  monkeypatch.setattr(_plans, 'PALLAS_FASTER', (region,))
  monkeypatch.setattr(_plans, 'cuda_backend', lambda: False)  # the CPU: the table is a GPU's
  assert not uses_pallas(make(cls))


def test_a_first_pallas_call_makes_no_jitted_function_trace_again():
  # jax 0.12's Pallas imported its fuser on a kernel's first lowering, and the
  # fuser registers a configuration option that jit's cache keys include: a
  # function jitted before it, and the layer's own jitted caller on its second
  # call, traced and compiled again (on a GPU, a training step's compile twice).
  # The package imports it. A fresh interpreter: this one has lowered kernels.
  # (jax 0.10's fuser registers nothing: fails without the import on jax 0.12.)
  code = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from flax import nnx
    import nnx_recurrent as nr
    traces = {'before': 0, 'layer': 0}
    @jax.jit
    def before(x):
      traces['before'] += 1
      return x * 2
    x = jnp.ones((1, 2, 16))
    before(x)
    layer = nr.GRU(16, 16, implementation='pallas', rngs=nnx.Rngs(0))
    @nnx.jit
    def call(layer, x):
      traces['layer'] += 1
      return layer(x)
    for _ in range(3):
      call(layer, x)
      before(x)
    print(traces)
  """)
  # The default platform: on a GPU machine the Triton lowering's imports are checked.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(Path(__file__).resolve().parents[1]), os.environ.get('PYTHONPATH', '')]))
  done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines()[-1] == "{'before': 1, 'layer': 1}", done.stdout


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_errors(cls, monkeypatch):
  layer = make(cls, implementation='pallas')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  name = cls.__name__
  with pytest.raises(ValueError, match=rf"{name}: `implementation` expected 'auto' or 'xla' here "
                                       r'\(Pallas runs on a GPU \(Triton\) or, interpreted, on '
                                       r"the CPU; the default backend is 'tpu'\), got 'pallas'"):
    layer(jnp.ones((B, T, I)))


def test_triton_lowering_nests_and_asks_for_an_abstract_gpu_only_without_one(monkeypatch):
  """A nested ``internal.triton_lowering`` leaves the outer one in force, and
  leaving it (also by an exception) ends it. Without a GPU it lowers for an
  abstract H200 (a one-device mesh of Auto axes: under Explicit ones the
  layers refuse 'pallas'; jax 0.10.0 has no abstract platform and needs
  none); on a GPU no abstract device is needed (the kernels lower for the GPU
  there)."""
  from nnx_recurrent._fused import _pallas

  with internal.triton_lowering():
    with internal.triton_lowering():
      pass
    assert _pallas._force_triton
    mesh = jax.sharding.get_abstract_mesh()
  assert not _pallas._force_triton
  with pytest.raises(ZeroDivisionError), internal.triton_lowering():
    1 / 0
  assert not _pallas._force_triton
  try:
    jax.sharding.AbstractDevice(device_kind='NVIDIA H200', num_cores=None, platform='cuda')
  except TypeError:  # jax 0.10.0
    pass
  else:
    if jax.default_backend() != 'gpu':
      assert (mesh.abstract_device.device_kind, mesh.abstract_device.platform) == \
        ('NVIDIA H200', 'cuda')
      assert tuple(mesh.axis_types) == (jax.sharding.AxisType.Auto,)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert isinstance(internal._abstract_gpu(), contextlib.nullcontext)


def test_checked_interpreter_nests_and_applies_only_where_the_kernels_are_interpreted():
  """Inside ``internal.checked_interpreter`` (nested too) the interpreted
  kernels' calls (``pallas_call``) take Pallas' checking interpreter, which raises on
  a read outside a buffer and starts outputs as NaN (no Triton parameters:
  that interpreter takes none); outside it (left by an exception too) the plain
  one, ``interpret=True``; under ``triton_lowering`` none (read off the traced
  programs)."""
  from jax.experimental.pallas import tpu as pltpu

  layer = make(nr.GRU, 1, False, seed=61, implementation='pallas')
  x = jnp.ones((B, T, I))

  def calls():
    jaxpr = jax.make_jaxpr(lambda x: run(layer, x, None))(x).jaxpr
    return [e.params for e in equations(jaxpr) if e.primitive.name == 'pallas_call']

  def interpreters():
    return [p['interpret'] for p in calls()]

  with internal.checked_interpreter():
    with internal.checked_interpreter():
      pass
    (checked,) = calls()
    with internal.triton_lowering():
      lowered = interpreters()
  params = checked['interpret']
  assert isinstance(params, pltpu.InterpretParams), params
  assert (params.out_of_bounds_reads, params.uninitialized_memory) == ('raise', 'nan')
  assert checked['compiler_params'] in (None, {}), checked['compiler_params']
  assert lowered == [False]
  assert interpreters() == [True]
  with pytest.raises(ZeroDivisionError), internal.checked_interpreter():
    1 / 0
  assert interpreters() == [True]


def test_a_jax_without_pallas_triton_backend(monkeypatch):
  """jax 0.11 deprecated Pallas' Triton backend, and a later jax removes it:
  then the kernels still run interpreted on the CPU (values against the
  scans), 'pallas' on a GPU says why it cannot run (not an ImportError, nor
  Mosaic GPU's rejection of the kernels), and 'auto' keeps the scans even where
  the kernels were measured faster."""
  from nnx_recurrent._fused import _pallas

  triton = _pallas._triton
  monkeypatch.setattr(_pallas, '_triton', lambda: None)
  layer = make(nr.GRU, seed=41, implementation='pallas')
  x = ref.normal((B, T, I), seed=42)
  if jax.default_backend() == 'cpu':  # on a GPU the same layer is refused (below)
    out, want = call(layer, x, run=lambda m, x: (m(x), with_implementation(m, 'xla')(x)))
    assert_trees_close(out, want)
  with pytest.raises(RuntimeError, match='has no Pallas Triton backend'):
    with internal.triton_lowering():
      pass
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(ValueError, match=r"GRU: `implementation` expected 'auto' or 'xla' here "
                                       r"\(Pallas lowers through Pallas' Triton backend, which "
                                       r"jax [\d.]+ no longer has "
                                       r"\(jax.experimental.pallas.triton\)\), got 'pallas'"):
    with_implementation(layer, 'pallas')(x)
  monkeypatch.setattr(_plans, 'cuda_backend', lambda: True)
  region = _plans.PallasRegion('GRU', rows=(B, B), hidden=(H, H), device='')
  monkeypatch.setattr(_plans, 'PALLAS_FASTER', (region,))
  with_implementation(layer, 'auto')

  def uses_pallas():  # a new function each time: make_jaxpr caches a function's trace
    return 'pallas_call' in str(jax.make_jaxpr(lambda x: layer(x))(x))

  assert not uses_pallas()
  monkeypatch.setattr(_pallas, '_triton', triton)  # with the backend: the same region picks it
  assert uses_pallas()


# Two cases cover each layer, each mask and each form of the residuals: the
# passes' derivatives (_pallas._forward_pass_jvp, _backward_pass_jvp) are the
# same code for both layers, and the layers' first order, written and rebuilt,
# with lengths and packed: the tests above.
@pytest.mark.parametrize('cls,masks,residuals', [(nr.LSTM, 'lengths', 'written'),
                                                 (nr.GRU, 'packed', 'rebuilt')])
def test_second_order_equals_the_scans(cls, masks, residuals):
  """The kernels have no derivative of their own: the custom VJP's two passes
  are differentiated through the scans' passes. A gradient of a gradient (of
  the parameters, the inputs and the initial carry: MAML's kind) and
  ``jax.hessian`` (forward over reverse) equal the scans', one bidirectional
  layer, lengths 5, 2 and 0 or packed segments (a later segment restarting
  mid-row, an empty row), a random initial carry; with the residuals written,
  or rebuilt (the GRU's forward then saves an empty array). The scans' second
  order against finite differences: ``tests/test_fused.py``."""
  layer = make(cls, 1, True, seed=61, implementation='pallas')
  x = ref.normal((B, T, I), seed=62)
  carry0 = random_carry(layer, seed=63)
  kw = dict(seq_lengths=LENGTHS) if masks == 'lengths' else dict(segment_ids=IDS[:, :T])

  def second_order(layer):
    graphdef, params = nnx.split(layer)

    def loss(params, x, carry):  # the outputs and the final carry (the forward's JVP of both)
      final, y = nnx.merge(graphdef, params)(x, initial_carry=carry, return_carry=True, **kw)
      return sum(jnp.sum(jnp.tanh(a) ** 2) for a in jax.tree_util.tree_leaves((final, y)))

    def gradient_norm(params, x, carry):
      grads = jax.grad(loss, argnums=(0, 1, 2))(params, x, carry)
      return sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads))

    @jax.jit
    def run(params, x, carry):
      return (jax.grad(gradient_norm, argnums=(0, 1, 2))(params, x, carry),
              jax.hessian(loss, argnums=1)(params, x, carry))

    return run(params, x, carry0)

  with internal.pallas_settings(residuals=residuals):
    got = second_order(layer)
  want = second_order(with_implementation(layer, 'xla'))
  assert_trees_close(got, want, atol=2e-5, rtol=2e-5)
  assert float(jnp.abs(got[1]).max()) > 1e-3  # the Hessian is not trivially zero


def test_pallas_under_shard_map_runs_without_check_vma_and_says_so_with_it():
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  layer = make(nr.LSTM, implementation='pallas')
  graphdef, state = nnx.split(layer)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, I)), jnp.float32)

  def forward(state, x, lengths):
    return nnx.merge(graphdef, state)(x, seq_lengths=lengths)

  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  specs = dict(mesh=mesh, in_specs=(P(), P('data'), P('data')), out_specs=P('data'))
  with pytest.raises(ValueError, match=r"LSTM: `implementation` expected 'auto' or 'xla' inside "
                                       r"jax.shard_map with check_vma=True \('pallas' runs there "
                                       r"with check_vma=False\), got 'pallas'"):
    jax.eval_shape(jax.shard_map(forward, **specs), state, x, LENGTHS)  # raised while tracing
  layer.implementation = 'xla'
  want = call(layer, x, seq_lengths=LENGTHS)
  got = jax.jit(jax.shard_map(forward, check_vma=False, **specs))(state, x, LENGTHS)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_pallas_with_a_symbolic_batch_says_to_use_the_scans():
  layer = make(nr.GRU, implementation='pallas')
  graphdef, state = nnx.split(layer)
  b, t = export.symbolic_shape('b, t')
  with pytest.raises(ValueError, match=r"GRU: `implementation` expected 'auto' or 'xla' for a "
                                       r'symbolic batch or time size \(jax.export\)'):
    export.export(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)))(
      state, jax.ShapeDtypeStruct((b, t, I), jnp.float32))


def _kernel_rows(layer, x):
  """The batch rows the layer's first Pallas kernel runs (its lengths input)."""
  jaxpr = jax.make_jaxpr(lambda x: layer(x))(x).jaxpr
  return next((e.invars[0].aval.shape[0] for e in equations(jaxpr)
               if e.primitive.name == 'pallas_call'), None)


@pytest.mark.parametrize('rows,hidden,padded', [(1, 16, 16), (16, 16, 16), (17, 16, 32),
                                                (129, 16, 192), (3, 256, 16), (33, 256, 48)])
def test_pallas_padded_rows_are_the_rows_the_kernels_run(rows, hidden, padded):
  """``internal.pallas_padded_rows``, by which ``benchmarks/pallas_verdict`` widens a
  measured region, is the batch the kernels actually run: 16-row blocks up to
  64 rows, blocks of 64 rows beyond (129 rows: 3 blocks, not a block of 256), fewer
  rows a block from ``H = 256`` on (the state is held on chip)."""
  layer = build(lambda: nr.GRU(I, hidden, implementation='pallas', rngs=nnx.Rngs(0)))
  assert internal.pallas_padded_rows(rows, hidden) == padded
  assert _kernel_rows(layer, jnp.ones((rows, 2, I))) == padded


def test_the_measured_table_auto_follows(monkeypatch):
  """The shipped ``PALLAS_FASTER`` (an H200's measurements): on an H200 'auto'
  runs the kernels at batch 1-16 and 64 for hidden 32, 1-32 for hidden 64,
  both layers, and the scans elsewhere, e.g. batch 17 or 33, hidden 128 or
  256; on another GPU never."""
  class Device:
    device_kind = 'NVIDIA H200'

  monkeypatch.setattr(_plans, 'cuda_backend', lambda: True)
  monkeypatch.setattr(_plans.jax, 'devices', lambda: [Device()])
  picks = {(layer.name, b, h) for layer in (nr.LSTM._math, nr.GRU._math)
           for b in (1, 4, 7, 8, 16, 17, 32, 33, 63, 64, 65) for h in (32, 64, 128, 256)
           if _plans.pallas_measured_faster(layer, b, h)}
  assert picks == {(name, b, h) for name in ('LSTM', 'GRU')
                   for b, h in [(1, 32), (4, 32), (7, 32), (8, 32), (16, 32), (64, 32),
                                (1, 64), (4, 64), (7, 64), (8, 64), (16, 64), (17, 64), (32, 64)]}
  Device.device_kind = 'NVIDIA A100'
  assert not _plans.pallas_measured_faster(nr.LSTM._math, 1, 64)
