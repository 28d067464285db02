"""The fused LSTM's cuDNN path (``implementation='cudnn'``).

On the CPU the cuDNN call itself is replaced by ``jax.experimental.rnn.lstm_ref``,
JAX's plain-JAX reference of the same function with the same packed weight
layout (unpacked by JAX's ``unpack_lstm_weights``): that checks everything
around the call (weight packing, carries, layouts, zero lengths, dropout
between layers, gradients to the cells' parameters) against the generic
``RNN`` / ``Bidirectional`` composition. On a CUDA GPU the last test runs
cuDNN itself against it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import rnn

import nnx_recurrent as nr
from nnx_recurrent._fused import _cudnn, internal
from tests import reference as ref
from tests import test_fused
from tests.test_fused import (
  LENGTHS,
  B,
  H,
  I,
  T,
  assert_trees_close,
  call,
  check_against_generic,
  check_plans_against_generic,
  random_carry,
)

ON_GPU = internal.cuda_backend()


def reference_lstm(x, h0, c0, weights, lengths, *, input_size, hidden_size, bidirectional):
  unpacked = rnn.unpack_lstm_weights(weights, input_size, hidden_size, 1, bidirectional)
  return rnn.lstm_ref(x, h0, c0, *unpacked, lengths, input_size, hidden_size, 1, 0.0,
                      bidirectional)


@pytest.fixture
def fake_gpu():
  """cuDNN 'available', run by the reference; counts the calls."""
  calls = []

  def lstm(*args, **kw):
    calls.append(kw)
    out = reference_lstm(*args, **kw)
    broken = jnp.any(args[4] < 1)  # cuDNN fails on zero lengths: poison the result
    return jax.tree_util.tree_map(lambda a: jnp.where(broken, jnp.nan, a), out)

  with internal.fake_cuda(lstm):
    yield calls


make = functools.partial(test_fused.make, nr.LSTM)  # a randomised nr.LSTM(I, H, ...)


@pytest.mark.parametrize('num_layers,bidirectional,lengths', [
  (1, False, None), (2, True, LENGTHS),
], ids=['1-uni-full', '2-bi-lengths'])
def test_matches_generic_values_and_grads(num_layers, bidirectional, lengths, fake_gpu):
  """With lengths: garbage at padding inert too (NaN, inf, 1e30 change no
  value and no gradient; the inputs' gradient there is zero)."""
  layer = make(num_layers, bidirectional, implementation='cudnn')
  x = ref.normal((B, T, I), seed=7)
  carry0 = random_carry(layer)
  padding = None if lengths is None else np.arange(T)[None, :] >= lengths[:, None]
  (out, _), = check_plans_against_generic(layer, x, carry0, ['default'], padding,
                                          seq_lengths=lengths).values()
  assert len(fake_gpu) == num_layers  # one call per layer, both directions in it
  assert all(kw['bidirectional'] == bidirectional for kw in fake_gpu)
  if lengths is not None:  # the zero-length row: zero outputs, initial carry
    final = out[0] if num_layers == 1 else out[0][-1]
    assert float(jnp.abs(out[1][2]).max()) == 0.0
    assert_trees_close(jax.tree_util.tree_map(lambda a: a[2], final),
                       jax.tree_util.tree_map(lambda a: a[2], carry0 if num_layers == 1
                                              else carry0[-1]))


def test_time_major_several_batch_axes_and_dropout(fake_gpu):
  """Layouts go through the flattening and back; dropout between layers is ours,
  so the same key drops the same units as the scans do. Out-of-range lengths
  (traced: unchecked) act as 0 and ``time``, as in the scans."""
  layer = make(2, True, dropout_rate=0.5, implementation='cudnn')
  x = ref.normal((T, 2, 3, I), seed=3)
  lengths = jnp.array([[5, -2, 3], [1, 4, T + 4]], jnp.int32)

  def both(m, x_and_lengths):  # one compilation: cuDNN (by its reference) and the scans
    x, lengths = x_and_lengths
    y = m(x, seq_lengths=lengths, time_major=True, rngs=nnx.Rngs(dropout=4))
    m.implementation = 'xla'
    return y, m(x, seq_lengths=lengths, time_major=True, rngs=nnx.Rngs(dropout=4))

  y, y_xla = call(layer, (x, lengths), run=both)
  assert len(fake_gpu) == 2
  assert y.shape == (T, 2, 3, 2 * H)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_xla), atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(y[:, 0, 1]).max()) == 0.0  # length -2: as 0


def test_auto_and_xla_use_the_scans(fake_gpu):
  """cuDNN through JAX measured slower than the scans: only 'cudnn' picks it
  (the backend is picked while tracing: traced only, nothing compiles)."""
  x = ref.normal((B, T, I), seed=1)
  jax.eval_shape(make(), x)
  jax.eval_shape(make(implementation='xla'), x)
  assert not fake_gpu
  jax.eval_shape(make(implementation='cudnn'), x)
  assert len(fake_gpu) == 1
  jax.eval_shape(make(implementation='cudnn'), x[:, :0])  # no step: nothing for cuDNN to run
  jax.eval_shape(make(implementation='cudnn'), x[:0])  # no row either
  assert len(fake_gpu) == 1


def test_fake_cuda_restores_what_it_replaced(fake_gpu, monkeypatch):
  """A nested ``internal.fake_cuda`` without a function runs jax's own
  ``rnn.lstm`` inside it (here a stand-in that records its calls), and leaves
  the outer one's substitute in place after it, also when left by an exception."""
  jax_lstm = []

  def recorded(x, h0, c0, weights, lengths, *, num_layers, dropout, **kw):
    jax_lstm.append(kw)
    return reference_lstm(x, h0, c0, weights, lengths, **kw)

  monkeypatch.setattr(rnn, 'lstm', recorded)
  layer = make(implementation='cudnn')

  def trace():  # a new function each time: jax caches a function's trace
    jax.eval_shape(lambda x: layer(x), jnp.ones((B, T, I)))

  with internal.fake_cuda():
    trace()
  assert len(jax_lstm) == 1 and not fake_gpu
  trace()
  assert len(fake_gpu) == 1
  with pytest.raises(ZeroDivisionError), internal.fake_cuda():
    1 / 0
  trace()
  assert len(fake_gpu) == 2 and len(jax_lstm) == 1


@pytest.mark.skipif(ON_GPU, reason='checks the CPU message')
def test_errors():
  with pytest.raises(ValueError, match=r"LSTM: `implementation` expected 'auto' or 'xla' or "
                                       r"'cudnn' or 'pallas', got 'cuda'"):
    nr.LSTM(3, 4, implementation='cuda', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"GRU: `implementation` expected 'auto' or 'xla' or "
                                       r"'pallas' \(jax.experimental.rnn has a cuDNN LSTM only\), "
                                       r"got 'cudnn'"):
    nr.GRU(3, 4, implementation='cudnn', rngs=nnx.Rngs(0))
  layer = test_fused.build(lambda: nr.LSTM(3, 4, implementation='cudnn', rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"LSTM: `implementation` expected 'auto', 'xla' or "
                                       r"'pallas' here \(cuDNN needs a CUDA GPU, and the default "
                                       r"backend is "
                                       r"'cpu'\), got 'cudnn'"):
    layer(jnp.ones((2, 5, 3)))


@pytest.mark.skipif(ON_GPU, reason='checks the CPU message')
def test_error_on_a_backend_without_pallas_names_the_scans_only(monkeypatch):
  """Where the Pallas kernels cannot run either (a TPU), 'pallas' is not offered."""
  layer = make(implementation='cudnn')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  with pytest.raises(ValueError, match=r"LSTM: `implementation` expected 'auto' or 'xla' here "
                                       r"\(cuDNN needs a CUDA GPU, and the default backend is "
                                       r"'tpu'\), got 'cudnn'"):
    jax.eval_shape(layer, jnp.ones((B, T, I)))


def test_implementation_set_after_construction_is_checked_at_the_call(fake_gpu):
  gru = test_fused.build(lambda: nr.GRU(3, 4, rngs=nnx.Rngs(0)))
  for value in ('cudnn', 'bogus'):
    gru.implementation = value  # the constructor refuses both; so does the call
    with pytest.raises(ValueError, match=r"GRU: `implementation` expected 'auto' or 'xla' or "
                                         rf"'pallas' \(jax.experimental.rnn has a cuDNN LSTM "
                                         rf"only\), got '{value}'"):
      jax.eval_shape(gru, jnp.ones((2, 5, 3)))  # raised while tracing: nothing compiles
  assert not fake_gpu


def test_unsupported_on_gpu_errors(fake_gpu):
  """Raised while tracing: traced only, nothing compiles. The two precisions
  cuDNN has (TF32 on or off) run, by each of their names."""
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
      layer = make(implementation='cudnn', dtype=dtype)
      with pytest.raises(ValueError, match=r'cuDNN runs float32 only, and the computation dtype '
                                           rf'is {jnp.dtype(dtype).name}\), got .cudnn.'):
        jax.eval_shape(layer, jnp.ones((2, 5, 3)))
  layer = make(implementation='cudnn')
  # 'default' is bfloat16 to jax.experimental.rnn (NotImplementedError there); a
  # dot-algorithm preset it would run as TF32.
  for precision in ('bfloat16', 'default', 'F32_F32_F32'):
    with jax.default_matmul_precision(precision):
      with pytest.raises(ValueError, match=rf"cuDNN has no matmul precision '{precision}' "
                                           r'\(jax_default_matmul_precision\)\), got .cudnn.'):
        jax.eval_shape(layer, jnp.ones((2, 5, 3)))
  assert not fake_gpu
  for precision in ('high', 'tensorfloat32', 'highest', 'float32'):
    with jax.default_matmul_precision(precision):
      jax.eval_shape(layer, jnp.ones((2, 5, 3)))
  assert len(fake_gpu) == 4


def test_a_cuda_backend_passes_the_check(monkeypatch):
  """Without ``internal.fake_cuda``: the check asks ``cuda_backend`` (here made
  to say yes; the cuDNN call is still the reference's)."""
  calls = []
  monkeypatch.setattr(_cudnn, 'cuda_backend', lambda: True)
  monkeypatch.setattr(_cudnn, '_substitute', lambda *a, **kw: calls.append(kw) or
                      reference_lstm(*a, **kw))
  jax.eval_shape(make(implementation='cudnn'), jnp.ones((B, T, I)))  # traced only
  assert len(calls) == 1


def test_every_operand_of_the_call_is_float32_and_the_carry_keeps_its_dtype():
  """bfloat16 parameters, inputs and carry with ``dtype=float32``, and int64
  lengths (x64): cuDNN gets float32 operands and int32 lengths (lstm_ref, the
  stand-in, would promote the rest itself); values and dtypes as the scans give."""
  operands = []

  def lstm(*args, **kw):
    operands.append(tuple(a.dtype for a in args))
    return reference_lstm(*args, **kw)

  bf16 = jnp.bfloat16
  with jax.enable_x64(True), internal.fake_cuda(lstm):
    layer = make(1, True, implementation='cudnn', param_dtype=bf16, dtype=jnp.float32)
    x = ref.normal((B, T, I), seed=7).astype(bf16)
    carry0 = jax.tree_util.tree_map(lambda a: a.astype(bf16), random_carry(layer))
    lengths = jnp.asarray(LENGTHS, jnp.int64)

    def both(m, x):  # one compilation: cuDNN (by its reference) and the scans
      outs = [m(x, initial_carry=carry0, return_carry=True, seq_lengths=s)
              for s in (None, lengths)]
      m.implementation = 'xla'
      return outs, [m(x, initial_carry=carry0, return_carry=True, seq_lengths=s)
                    for s in (None, lengths)]

    got, want = call(layer, x, run=both)
  assert operands == [(jnp.float32,) * 4 + (jnp.int32,)] * 2
  assert jax.tree_util.tree_map(lambda a: a.dtype, got) == \
    jax.tree_util.tree_map(lambda a: a.dtype, want)
  assert_trees_close(jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), got),
                     jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), want))


def test_the_call_reads_and_writes_row_major_arrays_and_cotangents(fake_gpu):
  """``_cudnn._row_major``: the operands ``x, h0, c0``, the results ``y, h_n,
  c_n`` and, in the VJP, the cotangents of all six are constrained to row-major
  memory. On the CPU no value depends on it; on a GPU, cuDNN read a transposed
  layout without it (jax-ml/jax#19177; test_real_cudnn_matches_generic)."""
  from tests.jaxprs import equations

  layer = make(1, True, implementation='cudnn')
  graphdef, params = nnx.split(layer)

  def loss(params, x, carry):
    return test_fused.weighted_loss(nnx.merge(graphdef, params)(
      x, initial_carry=carry, return_carry=True, seq_lengths=jnp.asarray(LENGTHS)))

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(
    params, jnp.ones((B, T, I)), random_carry(layer))
  constraints = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == 'layout_constraint']
  shapes = sorted(tuple(e.invars[0].aval.shape) for e in constraints)
  # x and dx, y and dy; h0, c0, h_n, c_n and their cotangents
  assert shapes == sorted([(B, T, I)] * 2 + [(B, T, 2 * H)] * 2 + [(2, B, H)] * 8)
  assert {e.params['layout'].major_to_minor for e in constraints} == {(0, 1, 2)}


def test_vmap_error():
  """The real primitive under jax.vmap (its batching rule is looked up before
  anything runs, so this needs no GPU): a clear message, not JAX's."""
  layer = make(implementation='cudnn')
  message = (r"LSTM: `implementation` expected 'auto' or 'xla' under jax.vmap "
             r"\(jax.experimental.rnn's cuDNN primitives have no batching rule\), got 'cudnn'")
  with internal.fake_cuda(), pytest.raises(ValueError, match=message):
    jax.eval_shape(jax.vmap(layer), jnp.ones((2, 5, 7, 3)))  # traced only


@pytest.mark.skipif(not ON_GPU, reason='needs a CUDA GPU')
@pytest.mark.parametrize('bidirectional,time_major', [(False, False), (True, False), (True, True)])
def test_real_cudnn_matches_generic(bidirectional, time_major):
  """cuDNN itself, in full float32 (TF32 off), against the generic RNN.

  Time-major inputs are transposed for cuDNN inside the jitted function: the
  case where XLA would hand cuDNN a transposed memory layout (see
  ``_cudnn._row_major``); unsorted lengths over two batch axes.
  """
  lengths = jnp.array([[5, 1], [3, 0]], jnp.int32)
  shape = (T, 2, 2, I) if time_major else (2, 2, T, I)
  with jax.default_matmul_precision('highest'):
    layer = make(2, bidirectional, implementation='cudnn', time_major=time_major)
    x = ref.normal(shape, seed=7)
    check_against_generic(layer, x, random_carry(layer, (2, 2)), lengths, time_major=time_major,
                          atol=1e-5, rtol=1e-4)
