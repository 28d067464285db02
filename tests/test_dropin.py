"""Drop-in fidelity with flax.nnx: signatures, cell state threaded through the
scan, RNG streams, custom cells, composition; and garbage in padding.

Every numerical check runs the same module (or an ``nnx.clone`` of it) under
``flax.nnx.RNN`` / ``flax.nnx.Bidirectional`` and compares, or compares a
garbage-padded run with a zero-padded one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import warnings

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests.jaxprs import equations
from tests.random_params import random_module
from tests.user_cells import SowingCell

B, T, IN, H = 3, 5, 4, 6
LENGTHS = jnp.array([5, 2, 0])


# A random carry_init for the layers compiled below: uniform, the cheapest
# random initializer to compile (every draw is inlined in a jitted program).
RANDOM_CARRY = jax.nn.initializers.uniform(1.0)


def _x(shape=(B, T, IN), seed=0):
  """Random normal inputs, drawn by NumPy (nothing to compile per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _np(a):
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    a = jax.random.key_data(a)
  return np.asarray(a)


def _close(a, b, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(_np(u), _np(v), atol=atol, rtol=0)


def m(*parts):
  return '.*'.join(re.escape(p) for p in parts)


# -- 1. every flax.nnx argument is accepted --------------------------------------------
_NAMES = ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell', 'RNN', 'Bidirectional']


def _params(fn):
  return {name: p for name, p in inspect.signature(fn).parameters.items() if name != 'self'}


@pytest.mark.parametrize('name', _NAMES)
def test_signatures_accept_every_flax_nnx_parameter(name):
  theirs, ours = getattr(nnx, name), getattr(nr, name)
  for method in ('__init__', '__call__', 'initialize_carry'):
    if not hasattr(theirs, method) or method == 'initialize_carry' and name in (
        'RNN', 'Bidirectional'):
      continue
    t, o = _params(getattr(theirs, method)), _params(getattr(ours, method))
    missing = sorted(set(t) - set(o))
    assert not missing, (name, method, missing)
    for arg, p in t.items():  # the same kind (keyword-only stays keyword-only) and default
      assert o[arg].kind == p.kind or p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, arg
      if p.default is not inspect.Parameter.empty and arg not in (
          'recurrent_kernel_init', 'kernel_init', 'bias_init', 'promote_dtype', 'merge_fn'):
        assert o[arg].default == p.default, (name, method, arg, o[arg].default, p.default)


def test_flax_nnx_recurrent_modules_public_names_are_ours():
  """`from flax.nnx.nn.recurrent import X` becomes `from nnx_recurrent import X`
  for every public class and function defined there; RNNBase states the same
  call, which each of our sequence layers takes, and modified_orthogonal
  draws flax's values."""
  import flax.nnx.nn.recurrent as flax_recurrent
  names = [n for n, v in vars(flax_recurrent).items()
           if not n.startswith('_') and (inspect.isclass(v) or inspect.isfunction(v))
           and v.__module__ == flax_recurrent.__name__]
  assert {'RNNBase', 'modified_orthogonal', 'RNN'} <= set(names)
  assert [n for n in names if n not in nr.__all__] == []
  want = _params(flax_recurrent.RNNBase.__call__)
  got = _params(nr.RNNBase.__call__)
  assert [(n, p.kind, p.default) for n, p in got.items()] == [
    (n, p.kind, p.default) for n, p in want.items()]
  for layer in (nr.RNN, nr.Bidirectional, nr.StackedRNN, nr.LSTM, nr.GRU):
    takes = _params(layer.__call__)
    for name, p in want.items():
      empty = inspect.Parameter.empty  # a default where flax has one (its value may be ours)
      assert name in takes and (takes[name].default is empty) == (p.default is empty), (layer, name)
      assert name == 'inputs' or takes[name].kind is inspect.Parameter.KEYWORD_ONLY, (layer, name)
  for shape, dtype in [((4, 12), jnp.float32), ((5, 3), jnp.bfloat16), ((3, 3), jnp.float16)]:
    key = jax.random.key(3)
    got, want = nr.modified_orthogonal(key, shape, dtype), flax_recurrent.modified_orthogonal(
      key, shape, dtype)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# -- 2. cell options: carry_init, promote_dtype, keep_rngs -------------------------------
@pytest.mark.parametrize('param_dtype', [jnp.float32, jnp.float64])
def test_equal_rngs_give_flax_nnx_parameters_under_x64(param_dtype):
  # flax.nnx.LSTMCell draws its recurrent kernels in JAX's default float type
  # (float64 under x64) and casts; the other cells draw in param_dtype.
  with jax.enable_x64(True):
    for name in ('LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell'):
      ours, theirs = (dict(nnx.to_flat_state(nnx.state(
        getattr(lib, name)(3, 4, param_dtype=param_dtype, rngs=nnx.Rngs(0)), nnx.Param)))
        for lib in (nr, nnx))
      for path in theirs:  # ours has GRUCell's bias_hn besides
        np.testing.assert_array_equal(ours[path][...], theirs[path][...], err_msg=f'{name} {path}')
        assert ours[path][...].dtype == param_dtype
    # Orthogonal to the parameters' precision (float64 kernels used to be computed in float32).
    kernel = np.asarray(nr.GRUCell(4, 4, param_dtype=param_dtype, rngs=nnx.Rngs(0))
                        .dense_h.kernel[...])  # (4, 12): orthonormal rows
    np.testing.assert_allclose(kernel @ kernel.T, np.eye(4),
                               atol=1e-12 if param_dtype == jnp.float64 else 1e-5)


@pytest.mark.parametrize('x64', [False, True])
def test_param_dtype_none_is_jaxs_default_float_as_in_flax(x64):
  # flax passes param_dtype=None on to its initializers: JAX's default float.
  with jax.enable_x64(x64):
    want = jnp.float64 if x64 else jnp.float32
    x = _x().astype(want)  # (flax.nnx's RNN refuses float32 inputs under x64: a carry change)
    names = ('LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell')
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # as flax's: no warning (NumPy's on finfo(None))
      ours = [nr.RNN(getattr(nr, name)(IN, H, param_dtype=None, rngs=nnx.Rngs(0)))
              for name in names]
    theirs = [nnx.RNN(getattr(nnx, name)(IN, H, param_dtype=None, rngs=nnx.Rngs(0)))
              for name in names]
    gru = ours[names.index('GRUCell')].cell  # flax.nnx's GRUCell has no b_hn
    gru.bias_hn[...] = jnp.zeros_like(gru.bias_hn[...])
    if x64:  # flax.nnx's SimpleCell fails: its step's carry comes in float32 (its recurrent
      theirs[-1] = None  # kernel is drawn in float32); ours keeps the carry's float64
    # Every layer's call in one program.
    outs = nnx.jit(lambda ours, theirs: [(o(x), None if t is None else t(x))
                                         for o, t in zip(ours, theirs)])(ours, theirs)
    for name, (y_o, y_t) in zip(names, outs):
      if y_t is None:
        continue
      assert y_o.dtype == y_t.dtype == want, name
      _close(y_o, y_t, atol=1e-6)


@pytest.mark.parametrize('name', ['LSTMCell', 'SimpleCell'])
def test_a_numpy_float64_carry_steps_as_in_flax_without_a_warning(name):
  # Without x64 JAX holds a NumPy float64 carry as float32; the step returns
  # that, as flax's does, with no warning about a float64 it cannot make.
  rng = np.random.default_rng(1)
  carry = rng.standard_normal((B, H))
  carry = (carry, carry[::-1].copy()) if name == 'LSTMCell' else carry
  x = rng.standard_normal((B, IN)).astype(np.float32)
  ours, theirs = (getattr(lib, name)(IN, H, rngs=nnx.Rngs(0)) for lib in (nr, nnx))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    out = ours(carry, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))
  _close(out, theirs(carry, x))


def test_half_precision_recurrent_kernels_are_orthogonal_in_their_dtype():
  # flax's orthogonal has no bfloat16 QR on the CPU: computed in float32 and cast.
  kernel = nr.GRUCell(4, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).dense_h.kernel[...]
  assert kernel.dtype == jnp.bfloat16
  k = np.asarray(kernel, np.float64)  # (4, 12): orthonormal rows, to bfloat16's precision
  np.testing.assert_allclose(k @ k.T, np.eye(4), atol=2e-2)


def test_a_bfloat16_gru_steps_a_bfloat16_carry_in_bfloat16_as_flax():
  # float32 parameters (b_hn among them, which flax.nnx's cell lacks), bfloat16
  # compute and carry: b_hn is added in bfloat16, not promoting the step.
  kw = dict(dtype=jnp.bfloat16)
  ours = nnx.eval_shape(lambda: nr.GRUCell(IN, H, **kw, rngs=nnx.Rngs(0)))
  theirs = nnx.eval_shape(lambda: nnx.GRUCell(IN, H, **kw, rngs=nnx.Rngs(0)))
  x, h = jnp.ones((B, IN)), jnp.zeros((B, H), jnp.bfloat16)
  dtypes = [nnx.eval_shape(lambda cell: cell(h, x)[1], cell).dtype for cell in (ours, theirs)]
  assert dtypes == [jnp.dtype(jnp.bfloat16)] * 2


@pytest.mark.parametrize('name', ['LSTMCell', 'SimpleCell'])  # (c, h) and h; one base class
def test_cell_options_carry_init_keep_rngs_as_flax(name):
  init = jax.nn.initializers.normal(1.0)
  kw = dict(carry_init=init, keep_rngs=True)
  with warnings.catch_warnings(record=True) as ours_w:
    warnings.simplefilter('always')
    ours = getattr(nr, name)(IN, H, rngs=nnx.Rngs(0), **kw)
  with warnings.catch_warnings(record=True) as theirs_w:
    warnings.simplefilter('always')
    theirs = getattr(nnx, name)(IN, H, rngs=nnx.Rngs(0), **kw)
  # flax.nnx's messages (its SimpleCell's lacks the others' trailing space)
  assert (sorted(str(w.message).strip() for w in ours_w)
          == sorted(str(w.message).strip() for w in theirs_w))
  assert len(ours_w) == 2
  # The kept stream and the constructor's carry_init: no rngs needed, flax's draws.
  _close(nnx.state(ours, nnx.RngState), nnx.state(theirs, nnx.RngState))
  _close(ours.initialize_carry((B, IN)), theirs.initialize_carry((B, IN)))
  _close(ours.initialize_carry((B, IN)), theirs.initialize_carry((B, IN)))  # streams advanced
  # An explicit Rngs is drawn from as flax.nnx draws (its carry stream, once per leaf).
  _close(ours.initialize_carry((B, IN), nnx.Rngs(carry=3)),
         theirs.initialize_carry((B, IN), nnx.Rngs(carry=3)))


@pytest.mark.parametrize('name', ['LSTMCell', 'GRUCell'])  # two draws and one
def test_a_zeros_carry_draws_from_the_kept_stream_as_flax(name):
  # flax.nnx draws a key per carry array from the keep_rngs stream even for
  # zeros, so the stream's next draws (a random carry here) depend on it.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    ours = getattr(nr, name)(IN, H, keep_rngs=True, rngs=nnx.Rngs(0))
    theirs = getattr(nnx, name)(IN, H, keep_rngs=True, rngs=nnx.Rngs(0))
  _close(ours.initialize_carry((B, IN)), theirs.initialize_carry((B, IN)), atol=0)
  _close(nnx.state(ours, nnx.RngState), nnx.state(theirs, nnx.RngState), atol=0)
  init = jax.nn.initializers.normal(1.0)
  _close(ours.initialize_carry((B, IN), carry_init=init),
         theirs.initialize_carry((B, IN), carry_init=init), atol=0)


@pytest.mark.parametrize('name', ['LSTMCell', 'GRUCell'])
def test_a_zeros_carry_draws_from_a_default_stream_as_flax(name):
  # An Rngs with a default stream only: flax.nnx's rngs.carry falls back to it and
  # draws once per carry array even for zeros; the stream's later keys must be flax's.
  streams = [nnx.Rngs(5), nnx.Rngs(5)]
  for lib, rngs in zip((nr, nnx), streams):
    getattr(lib, name)(IN, H, rngs=nnx.Rngs(1)).initialize_carry((B, IN), rngs)
  assert int(streams[0].default.count[...]) == int(streams[1].default.count[...]) > 0
  np.testing.assert_array_equal(jax.random.key_data(streams[0].default()),
                                jax.random.key_data(streams[1].default()))


def test_keep_rngs_forks_the_carry_stream_as_flax():
  # With carry and dropout streams told apart: the kept stream is the carry one.
  init = jax.nn.initializers.normal(1.0)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    ours, theirs = (lib.LSTMCell(IN, H, keep_rngs=True, carry_init=init,
                                 rngs=nnx.Rngs(params=0, carry=3, dropout=7)) for lib in (nr, nnx))
  _close(ours.initialize_carry((B, IN)), theirs.initialize_carry((B, IN)), atol=0)


@pytest.mark.parametrize('name', ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell'])
def test_initialize_carry_reads_the_batch_axes_only_as_flax(name):
  # Code calls initialize_carry((batch, hidden_features)): flax.nnx ignores the
  # feature axis's size, and reads `()` as one unbatched step.
  ours = getattr(nr, name)(IN, H, rngs=nnx.Rngs(0))
  theirs = getattr(nnx, name)(IN, H, rngs=nnx.Rngs(0))
  init = jax.nn.initializers.normal(1.0)
  for shape in ((B, IN), (B, H + 3), (2, B, 1), ()):
    _close(ours.initialize_carry(shape, nnx.Rngs(carry=1), carry_init=init),
           theirs.initialize_carry(shape, nnx.Rngs(carry=1), carry_init=init), atol=0)


@pytest.mark.parametrize('name', ['LSTMCell', 'GRUCell'])
def test_flax_transforms_take_a_cell_itself(name):
  # nnx.scan / vmap / remat of the cell object (not of a function calling it):
  # they need its __call__ to have no keyword-only arguments with defaults.
  ours = getattr(nr, name)(IN, H, rngs=nnx.Rngs(0))
  theirs = getattr(nnx, name)(IN, H, rngs=nnx.Rngs(0))
  xs = _x((T, B, IN))
  carry = theirs.initialize_carry((B, IN), nnx.Rngs(0))
  batched = jax.tree.map(lambda c: jnp.stack([c, c + 1.0]), carry)
  xb = jnp.stack([xs[0], xs[1]])

  @nnx.jit  # the three transforms of the cell object, in one program per library
  def transformed(cell):
    scanned = nnx.scan(cell, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(carry, xs)
    vmapped = nnx.vmap(cell, in_axes=(0, 0), out_axes=0)(batched, xb)
    return scanned, vmapped, nnx.remat(cell)(carry, xs[0])

  _close(transformed(ours), transformed(theirs))


def test_gru_without_bias_hn_is_flax_nnx_gru_in_state_and_training():
  optax = pytest.importorskip('optax')
  ours = nr.GRUCell(IN, H, use_bias_hn=False, rngs=nnx.Rngs(0))
  theirs = nnx.GRUCell(IN, H, rngs=nnx.Rngs(0))
  _close(nnx.state(ours), nnx.state(theirs), atol=0)  # the same paths, types and values
  x = _x()

  # With b_hn (the default) the same start trains b_hn too.
  with_hn = nr.GRUCell(IN, H, rngs=nnx.Rngs(0))
  models = [nr.RNN(ours), nnx.RNN(theirs), nr.RNN(with_hn)]
  opts = [nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param) for model in models]

  @nnx.jit  # the three models' steps in one program
  def step(models, opts):
    losses = []
    for model, opt in zip(models, opts):
      loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
      opt.update(model, grads)
      losses.append(loss)
    return losses

  losses = [step(models, opts) for _ in range(3)]
  _close([ls[0] for ls in losses], [ls[1] for ls in losses], atol=1e-5)
  _close(nnx.state(ours), nnx.state(theirs), atol=1e-5)
  assert float(jnp.abs(with_hn.bias_hn[...]).max()) > 0.01
  with pytest.raises(TypeError, match=m('GRUCell: `use_bias_hn` expected a bool', "got 'no'")):
    nr.GRUCell(IN, H, use_bias_hn='no', rngs=nnx.Rngs(0))


def test_gru_metadata_and_promote_dtype_reach_the_same_places_as_flax_nnx_grus():
  # Each metadata of its own, and a promote_dtype that rounds through bfloat16: flax.nnx's
  # GRUCell is the reference for where each lands (every parameter, both dense layers).
  def promote(arrays, dtype=None, **kwargs):
    return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in arrays)

  kw = dict(kernel_metadata={'tag': 'k'}, recurrent_kernel_metadata={'tag': 'rk'},
            bias_metadata={'tag': 'b'})
  ours, theirs, plain = (nnx.eval_shape(make) for make in (  # no initializer compiles
    lambda: nr.GRUCell(IN, H, use_bias_hn=False, promote_dtype=promote, **kw, rngs=nnx.Rngs(0)),
    lambda: nnx.GRUCell(IN, H, promote_dtype=promote, **kw, rngs=nnx.Rngs(0)),
    lambda: nr.GRUCell(IN, H, use_bias_hn=False, **kw, rngs=nnx.Rngs(0))))
  assert {p: v.get_metadata() for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))} == {
    p: v.get_metadata() for p, v in nnx.to_flat_state(nnx.state(theirs, nnx.Param))}
  rng = np.random.default_rng(2)  # random parameters (biases included), the same in all three
  params = jax.tree.map(lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype),
                        nnx.state(ours, nnx.Param))
  for cell in (ours, theirs, plain):
    nnx.update(cell, params)
  h, x = _x((B, H), seed=1), _x((B, IN))
  got, want, unpromoted = nnx.jit(lambda cells: [c(h, x)[1] for c in cells])(
    (ours, theirs, plain))
  _close(got, want, atol=0)
  assert not np.allclose(got, unpromoted, atol=1e-4)  # it mattered


def test_cells_without_keep_rngs_hold_no_prng_state():
  for name in ('LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell', 'MGUCell'):
    cell = nnx.eval_shape(lambda name=name: getattr(nr, name)(IN, H, rngs=nnx.Rngs(0),
                                                              keep_rngs=False))
    assert not jax.tree.leaves(nnx.state(cell, nnx.RngState)), name


def test_promote_dtype_is_used_as_in_flax():
  calls = []

  def promote(arrays, dtype=None, **kwargs):  # rounds everything through bfloat16
    calls.append(len(arrays))
    return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in arrays)

  ours = nr.OptimizedLSTMCell(IN, H, promote_dtype=promote, rngs=nnx.Rngs(0))
  theirs = nnx.OptimizedLSTMCell(IN, H, promote_dtype=promote, rngs=nnx.Rngs(0))
  plain = nr.OptimizedLSTMCell(IN, H, rngs=nnx.Rngs(0))
  carry, x = ours.initialize_carry((B, IN)), _x((B, IN))
  # A convolutional cell's two convolutions take it too; reference: flax's nnx.Conv with
  # it, on the cell's parameters, and the GRU formula.
  conv = nnx.eval_shape(lambda: nr.ConvGRUCell(IN, H, (3,), promote_dtype=promote,
                                                rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)  # random parameters without an initializer to compile
  nnx.update(conv, jax.tree.map(lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype),
                                nnx.state(conv, nnx.Param)))
  ih, hh = (nnx.eval_shape(lambda n=n: nnx.Conv(n, 3 * H, (3,), promote_dtype=promote,
                                                rngs=nnx.Rngs(0))) for n in (IN, H))
  nnx.update(ih, nnx.state(conv.ih))
  nnx.update(hh, nnx.state(conv.hh))
  xc = _x((B, 5, IN))
  hc = jnp.asarray(rng.normal(size=(B, 5, H)), jnp.float32)
  counts = []

  @nnx.jit  # one program; promote runs (and counts) as the trace calls the cells
  def steps(ours, theirs, plain, conv, ih, hh):
    out_o = ours(carry, x)
    counts.append(len(calls))
    out_t = theirs(carry, x)
    counts.append(len(calls))
    out_c = conv(hc, xc)
    counts.append(len(calls))
    (xr, xz, xn), (hr, hz, hn) = (jnp.split(a, 3, axis=-1) for a in (ih(xc), hh(hc)))
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    want_c = (1 - z) * jnp.tanh(xn + r * hn) + z * hc
    return out_o, out_t, plain(carry, x), out_c, want_c

  out_o, out_t, out_p, out_c, want_c = steps(ours, theirs, plain, conv, ih, hh)
  assert counts == [2, 4, 6]  # both dense layers (convolutions) promote through it
  _close(out_o, out_t, atol=0)
  assert not np.allclose(out_o[1], out_p[1], atol=1e-4)  # it mattered
  _close(out_c[1], want_c, atol=1e-6)


# -- 3. a stateful cell: its state goes through the scan as in flax.nnx -----------------
class CountingDropoutCell(nnx.Module):
  """A user cell that counts its steps and holds its own nnx.Dropout (own stream)."""

  def __init__(self, rngs, rate=0.5, stream='dropout'):
    self.cell = nnx.OptimizedLSTMCell(IN, H, rngs=rngs)
    self.steps = nnx.Variable(jnp.zeros((), jnp.int32))
    self.drop = nnx.Dropout(rate, rng_collection=stream, rngs=rngs)

  @property
  def num_feature_axes(self):
    return 1

  def initialize_carry(self, input_shape, rngs):  # flax.nnx's style: rngs required
    del rngs
    return (jnp.zeros((*input_shape[:-1], H)),) * 2

  def __call__(self, carry, x):
    self.steps[...] += 1
    carry, y = self.cell(carry, x)
    return carry, self.drop(y)


def _flax_cell(rngs, cls=None, **kw):
  """The same cell class over flax.nnx's own OptimizedLSTMCell (equal params)."""
  cell = (cls or CountingDropoutCell)(rngs, **kw)
  theirs = nnx.OptimizedLSTMCell(IN, H, rngs=nnx.Rngs(0))
  nnx.update(theirs, nnx.state(cell.cell, nnx.Param))
  cell.cell = theirs
  return cell


# flax 0.12's tree mode (nnx.set_graph_mode(False), set_graph_updates(False)):
# flax.nnx's RNN scans with graph-mode transforms there, and so do we.
MODES = {'graph': lambda: contextlib.nullcontext(), 'tree': lambda: nnx.set_graph_mode(False),
         'no_graph_updates': lambda: nnx.set_graph_updates(False)}


@functools.cache  # the reference of every mode, jit or not, and remat below: computed once
def _flax_counting_runs():
  """flax.nnx.RNN's outputs at two calls over the counting cell, and its
  counter and dropout stream's count after each call."""
  theirs = nnx.RNN(_flax_cell(nnx.Rngs(0, dropout=1)))
  call = nnx.jit(lambda rnn: rnn(_x()))  # it carries the state's updates out
  runs = []
  for _ in range(2):
    y = call(theirs)
    runs.append((y, int(theirs.cell.steps[...]), int(theirs.cell.drop.rngs.count[...])))
  return runs


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('mode', MODES)
def test_cell_state_and_rng_streams_persist_as_in_flax(jit, mode):
  ours = nr.RNN(CountingDropoutCell(nnx.Rngs(0, dropout=1)))
  x = _x()
  call = nnx.jit(lambda rnn, x: rnn(x)) if jit else (lambda rnn, x: rnn(x))
  outs = []
  for y_t, steps, count in _flax_counting_runs():
    with MODES[mode]():
      y_o = call(ours, x)
    _close(y_o, y_t)  # the same dropout masks: the stream advanced the same way
    assert int(ours.cell.steps[...]) == steps and int(ours.cell.drop.rngs.count[...]) == count
    outs.append(y_o)
  assert steps == count == 2 * T  # flax.nnx's, after the second call
  assert not np.array_equal(np.asarray(outs[0] == 0), np.asarray(outs[1] == 0))  # new masks
  zeros = np.asarray(outs[0] == 0)
  assert not (zeros == zeros[:, :1]).all()  # and a new mask at every step


def test_cell_state_and_rng_streams_persist_under_remat_as_in_flax():
  # remat recomputes each step in the backward pass; the forward pass still
  # threads the cell's counter and dropout stream from step to step.
  ours = nr.RNN(CountingDropoutCell(nnx.Rngs(0, dropout=1)), remat=True)
  x = _x()
  y_t, steps, count = _flax_counting_runs()[0]  # flax.nnx's first call
  _close(nnx.jit(lambda ours: ours(x))(ours), y_t)
  assert int(ours.cell.steps[...]) == steps == T
  assert int(ours.cell.drop.rngs.count[...]) == count == T


def _own_dropout_cell(base, seen):
  """A cell in flax.nnx's style on ``base`` (either library's RNNCellBase)
  whose attributes are named like this package's options: its own
  ``dropout_rate``, ``zoneout_rate``, ``deterministic`` and stream, and a
  ``__call__`` that takes ``**kwargs`` (their names go into ``seen``)."""

  class OwnDropoutCell(base):
    num_feature_axes = 1

    def __init__(self, rngs):
      self.lin = nnx.Linear(IN + H, H, rngs=rngs)
      self.dropout_rate = self.zoneout_rate = 0.5
      self.deterministic = False
      self.rngs = rngs

    def initialize_carry(self, input_shape, rngs=None):
      return jnp.zeros((*input_shape[:-1], H))

    def __call__(self, carry, x, **kwargs):
      seen.extend(kwargs)
      h = jnp.tanh(self.lin(jnp.concatenate([x, carry], -1)))
      if not self.deterministic:
        keep = jax.random.bernoulli(self.rngs.dropout(), 1 - self.dropout_rate, h.shape)
        h = jnp.where(keep, h / (1 - self.dropout_rate), 0.0)
      return h, h

  class WithoutKwargs(OwnDropoutCell):
    def __call__(self, carry, x):
      return super().__call__(carry, x)

  return OwnDropoutCell(nnx.Rngs(0, dropout=1)), WithoutKwargs(nnx.Rngs(0, dropout=1))


def test_a_flax_style_cells_own_dropout_attributes_are_its_own_as_in_flax():
  # Neither this package's dropout masks nor a step's key reach a cell that
  # only shares the attributes' names, **kwargs or not, and nnx.view leaves its
  # own `deterministic` alone (flax.nnx's RNNCellBase has no set_view).
  seen, runs = [], {}
  for ns in (nnx, nr):
    cell, without_kwargs = _own_dropout_cell(ns.RNNCellBase, seen)
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # nor a warning that RNN cannot pass them
      rnn, _ = ns.RNN(cell), ns.RNN(without_kwargs)
    call_rngs = nnx.Rngs(2)
    ys = [rnn(_x(), rngs=call_rngs) for _ in range(2)]
    model = nnx.Sequential(rnn, nnx.Dropout(0.1, rngs=nnx.Rngs(3)))
    view = nnx.view(model, deterministic=True)
    runs[ns] = (ys, int(cell.rngs.dropout.count[...]), int(call_rngs.default.count[...]),
                view.layers[0].cell.deterministic)
  assert not seen
  _close(runs[nr][0], runs[nnx][0], atol=0)
  assert runs[nr][1:] == runs[nnx][1:] == (2 * T, 2, False)


@pytest.mark.parametrize('state_axes, steps', [
  ({nnx.Param: None, ...: nnx.Carry}, T),  # the counter is carried: it counts
  ({nnx.Param: None, nnx.Variable: None, ...: nnx.Carry}, 0),  # broadcast: changes dropped
])
def test_state_axes_of_several_kinds_of_filter(state_axes, steps):
  # A mapping whose filters are a type and ..., as flax.nnx's docs write them:
  # flax.nnx's RNN (0.12) fails there, its dict attribute a pytree whose keys do not
  # sort ("Comparator raised exception while sorting pytree dictionary keys").
  cell = CountingDropoutCell(nnx.Rngs(0, dropout=1), rate=0.0)
  y = nr.RNN(cell, state_axes=state_axes)(_x())
  assert int(cell.steps[...]) == steps
  _close(y, nr.RNN(CountingDropoutCell(nnx.Rngs(0, dropout=1), rate=0.0))(_x()))


class AttributeCountingCell(nr.SimpleCell):
  """Keeps plain Python attributes (not Variables) that its step changes."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.traces, self.seen = 0, None

  def __call__(self, carry, x):
    self.traces += 1  # once per trace: the scan traces the step once
    self.seen = tuple(x.shape)
    return super().__call__(carry, x)


@pytest.mark.parametrize('remat', [False, True])
def test_plain_attribute_changes_in_a_step_persist_as_in_flax(remat):
  # flax.nnx's RNN (and nnx.remat) carry a step's attribute changes out of the
  # scan; under remat the step runs on a copy inside jax.checkpoint.
  x = _x()
  runs = {}
  for name, make in (('ours', lambda c: nr.RNN(c, remat=remat)), ('theirs', nnx.RNN)):
    cell = AttributeCountingCell(IN, H, rngs=nnx.Rngs(0))
    layer = make(cell)
    y = layer(x, seq_lengths=LENGTHS)
    grads = nnx.grad(lambda m: (m(x) ** 2).sum())(layer)
    runs[name] = (y, cell.traces, cell.seen, nnx.state(grads, nnx.Param))
  (y_o, traces_o, seen_o, g_o), (y_t, traces_t, seen_t, g_t) = runs['ours'], runs['theirs']
  assert (traces_o, seen_o) == (traces_t, seen_t) == (2, (B, IN))
  valid = (jnp.arange(T)[None] < LENGTHS[:, None])[..., None]
  _close(y_o, jnp.where(valid, y_t, 0.0), atol=1e-6)  # ours: zeros at padding
  _close(g_o, g_t, atol=1e-5)


def _mode_layers():
  rngs = lambda: nnx.Rngs(0, dropout=1)  # noqa: E731
  return [
    nr.RNN(nr.LSTMCell(IN, H, dropout_rate=0.3, zoneout_rate=0.2, rngs=rngs()), remat=True),
    nr.RNN(nr.GRUCell(IN, H, rngs=rngs()), learn_initial_carry=True),
    nr.Bidirectional(nr.RNN(nr.LSTMCell(IN, H, rngs=rngs())),
                     nr.RNN(nr.MGUCell(IN, H, recurrent_dropout_rate=0.3, rngs=rngs()))),
    nr.StackedRNN(nr.RNN(nr.SimpleCell(IN, H, rngs=rngs())),
                  nr.RNN(nr.GRUCell(H, H, rngs=rngs())), dropout_rate=0.3, rngs=rngs()),
  ]


def _mode_loss(m):
  return (m(_x(), seq_lengths=jnp.array([T, 2, 0][:B])) ** 2).sum()


def _mode_rnn():
  return nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(0)))


@functools.cache  # the graph-mode expectations, computed once for both modes
def _graph_mode_expectations():
  # Under graph mode's nnx.jit (it carries the streams' updates out: its second
  # call is the same program).
  x, lengths = _x(), jnp.array([T, 2, 0][:B])

  # Two calls (the second: the streams advanced alike), but one for the GRU
  # layer, which holds no stream (its second call would be its first again);
  # every layer's calls and the gradients in one program (one compile, not five).
  @nnx.jit
  def graph_calls(layers, rnn):
    return ([[layer(x, seq_lengths=lengths) for _ in range(calls)]
             for layer, calls in zip(layers, (2, 1, 2, 2))], nnx.grad(_mode_loss)(rnn))

  return graph_calls(_mode_layers(), _mode_rnn())


@pytest.mark.parametrize('mode', ['tree', 'no_graph_updates'])
def test_layers_in_tree_mode_as_in_graph_mode(mode):
  x, lengths = _x(), jnp.array([T, 2, 0][:B])
  outs, expected_grads = _graph_mode_expectations()
  # The calls under test are eager, in the mode.
  for tree, expected in zip(_mode_layers(), outs):
    for expected_call in expected:
      with MODES[mode]():
        _close(tree(x, seq_lengths=lengths), expected_call)
  with MODES[mode]():  # and it trains there, as flax.nnx's RNN does
    grads = nnx.jit(nnx.grad(_mode_loss))(_mode_rnn())
  _close(nnx.state(grads, nnx.Param), expected_grads)  # tree mode's grads come as a module


def test_plain_jax_transforms_take_the_layers_as_pytrees_as_flax():
  """flax Modules are pytrees (flax_pytree_module): plain jax.jit takes nr.RNN
  as flax.nnx's, with its values on the valid steps (NaN in the padding
  reaches nothing), and jax.grad gives nnx.grad's gradients.
  flax.nnx's RNN holds a uint32 RNG key, which jax.grad refuses; ours holds
  none without dropout."""
  # (The inputs and masks made by NumPy, the gradients under jit: no program per eager op.)
  valid = (np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None])[..., None]
  x = jnp.asarray(np.where(valid, _x(), np.nan))
  x_finite = jnp.asarray(np.where(valid, _x(), 1e3))  # flax.nnx's gradients take NaN from it

  def layer(lib):
    return lib.RNN(lib.LSTMCell(IN, H, rngs=nnx.Rngs(0)))

  def loss(m, x=x):
    return (jnp.where(valid, m(x, seq_lengths=LENGTHS), 0.0) ** 2).sum()

  ours, theirs = layer(nr), layer(nnx)
  y = jax.jit(lambda m: m(x, seq_lengths=LENGTHS))(ours)
  want = jax.jit(lambda m: m(x, seq_lengths=LENGTHS))(theirs)
  _close(np.where(valid, y, 0.0), np.where(valid, want, 0.0))
  assert not np.any(np.where(valid, 0.0, y))  # zeros at padding
  grads = jax.jit(jax.grad(loss))(ours)
  assert isinstance(grads, nr.RNN)
  want_grads = nnx.jit(nnx.grad(lambda m: loss(m, x_finite)))(theirs)
  _close(nnx.state(grads, nnx.Param), nnx.state(want_grads, nnx.Param), atol=1e-5)
  with pytest.raises(TypeError, match='grad requires real- or complex-valued inputs'):
    jax.grad(loss)(theirs)


# flax's Variable modes (array refs, hijax); flax 0.12.7 names it vars_as.
_with_vars = getattr(nnx, 'with_vars', None) or nnx.vars_as


_REF_LAYERS = {
  'RNN': lambda: nr.RNN(nr.LSTMCell(IN, H, dropout_rate=0.5, zoneout_rate=0.2,
                                    rngs=nnx.Rngs(0, dropout=1))),
  'counting cell': lambda: nr.RNN(CountingDropoutCell(nnx.Rngs(0, dropout=1))),
  'Bidirectional': lambda: nr.Bidirectional(
    nr.RNN(nr.GRUCell(IN, H, recurrent_dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))),
    nr.RNN(CountingDropoutCell(nnx.Rngs(1, dropout=2)))),
  'StackedRNN': lambda: nr.StackedRNN(nr.RNN(nr.SimpleCell(IN, H, rngs=nnx.Rngs(0))),
                                      nr.RNN(nr.GRUCell(H, H, rngs=nnx.Rngs(1))),
                                      dropout_rate=0.5, rngs=nnx.Rngs(2)),
  'LSTM': lambda: nr.LSTM(IN, H, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1)),
  'GRU': lambda: nr.GRU(IN, H, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1)),
}


@pytest.mark.parametrize('name', list(_REF_LAYERS))
def test_layers_run_with_array_refs_under_jax_jit(name):
  """flax's array refs (nnx.with_vars(model, ref=True); flax.nnx's RNN fails
  there): under plain jax.jit a layer gives what it gives under nnx.jit, and
  what its cells change (a step counter, dropout and zoneout streams, a user
  cell's own nnx.Dropout stream) persists
  through the refs as under nnx.jit: two calls, the same two outputs, the same
  state after."""
  _check_as_under_nnx_jit(name, 'ref')


def _check_as_under_nnx_jit(name: str, mode: str) -> None:
  """``_REF_LAYERS[name]`` with its Variables in ``mode`` ('ref' or 'hijax'),
  called twice under plain jax.jit, against the plain layer under nnx.jit: the
  same two outputs, the same state after, its step counters at ``2 * T``."""
  x, call = _x(), lambda m, x: m(x, seq_lengths=LENGTHS)  # noqa: E731
  wrapped, plain = _with_vars(_REF_LAYERS[name](), **{mode: True}), _REF_LAYERS[name]()
  got_call, want_call = jax.jit(call), nnx.jit(call)  # each compiled once, called twice
  got = [got_call(wrapped, x) for _ in range(2)]
  want = [want_call(plain, x) for _ in range(2)]
  _close(got, want)
  assert not np.allclose(want[0], want[1])  # the streams advanced
  _close(nnx.state(_with_vars(wrapped, **{mode: False})), nnx.state(plain))
  counters = [int(v[...]) for path, v in nnx.iter_graph(wrapped)
              if isinstance(v, nnx.Variable) and path[-1] == 'steps']
  assert counters == ([2 * T] if 'cell' in name or name == 'Bidirectional' else [])


def test_a_cell_of_hijax_variables_runs_and_keeps_its_state():
  """flax's hijax Variables (nnx.with_vars(model, hijax=True); flax.nnx's RNN
  fails there), called eagerly: the outputs and the counter of the plain layer."""
  with_hijax = _with_vars(_REF_LAYERS['counting cell'](), hijax=True)
  plain = _REF_LAYERS['counting cell']()
  _close(with_hijax(_x(), seq_lengths=LENGTHS), plain(_x(), seq_lengths=LENGTHS))
  assert int(with_hijax.cell.steps[...]) == int(plain.cell.steps[...]) == T


@functools.cache
def _flax_writes_hijax_back_under_jit() -> bool:
  """Whether flax lets plain ``jax.jit`` change a hijax Variable (0.12.8 writes
  the change back; 0.12.12 raises ImmutableVariableError: 'use ref=True')."""
  v = nnx.Variable(jnp.zeros((), jnp.int32), hijax=True)

  def increment(v):
    v[...] += 1

  try:
    jax.jit(increment)(v)
  except flax.errors.ImmutableVariableError:
    return False
  return int(v[...]) == 1


@pytest.mark.parametrize('name', ['counting cell', 'Bidirectional', 'LSTM'])
def test_layers_with_hijax_variables_under_jax_jit_follow_flaxs_rule(name):
  """hijax Variables under plain jax.jit (flax.nnx's RNN fails over hijax
  Variables), by flax's own rule for a Variable changed under jit: where flax
  writes it back (0.12.8), a layer gives what it gives under nnx.jit and what
  its cells change (a user cell's counter, dropout streams) persists, as with
  array refs; where flax refuses (0.12.12), the layer raises flax's error."""
  if _flax_writes_hijax_back_under_jit():
    _check_as_under_nnx_jit(name, 'hijax')
  else:
    with_hijax = _with_vars(_REF_LAYERS[name](), hijax=True)
    with pytest.raises(flax.errors.ImmutableVariableError, match='use ref=True'):
      jax.jit(lambda m, x: m(x, seq_lengths=LENGTHS))(with_hijax, _x())


# Layers without dropout or a cell's own state: a call changes no Variable.
_STATELESS_LAYERS = (
  lambda: nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0))),
  lambda: nr.LSTM(IN, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0)),
)


def test_layers_with_nothing_to_change_run_with_hijax_variables_under_jax_jit():
  """Without dropout or a cell's own state nothing is written, so every flax
  release runs hijax layers under plain jax.jit: the outputs of nnx.jit over
  the plain layers, the parameters untouched."""
  x, call = _x(), lambda m, x: m(x, seq_lengths=LENGTHS)  # noqa: E731
  for make in _STATELESS_LAYERS:
    with_hijax, plain = _with_vars(make(), hijax=True), make()
    _close(jax.jit(call)(with_hijax, x), nnx.jit(call)(plain, x))
    _close(nnx.state(_with_vars(with_hijax, hijax=False)), nnx.state(plain))


def test_jax_grad_over_hijax_layers_follows_flax():
  """jax.grad over a model of hijax Variables: where flax differentiates them
  (0.12.12, nnx.Linear's), the gradients nnx.grad gives for the plain layers;
  where it cannot (0.12.8), the layers fail as nnx.Linear does."""
  x = _x()
  loss = lambda m: (m(x, seq_lengths=LENGTHS) ** 2).sum()  # noqa: E731
  try:
    linear = _with_vars(nnx.Linear(IN, H, rngs=nnx.Rngs(0)), hijax=True)
    jax.grad(lambda m: m(x).sum())(linear)
    flax_differentiates = True
  except NotImplementedError as error:
    flax_differentiates, message = False, str(error)
  for make in _STATELESS_LAYERS:
    with_hijax, plain = _with_vars(make(), hijax=True), make()
    if not flax_differentiates:
      with pytest.raises(NotImplementedError, match=re.escape(message)):
        jax.grad(loss)(with_hijax)
      continue
    got = _with_vars(jax.jit(jax.grad(loss))(with_hijax), hijax=False)
    want = nnx.jit(nnx.grad(loss))(plain)
    _close(nnx.state(got, nnx.Param), nnx.state(want, nnx.Param), atol=1e-5)


@pytest.mark.filterwarnings('ignore:Using .Module.sow\\(\\). outside:DeprecationWarning')
def test_values_sown_at_each_step_reach_a_cell_of_array_refs():
  """A sowing cell (state_axes stacking its values over time) with array refs,
  called eagerly, plainly and under nnx.capture: the stacked values are the
  cell's, as without refs."""
  axes = nnx.StateAxes({nnx.Intermediate: 0, ...: nnx.Carry})

  def layer(refs):
    rnn = nr.RNN(SowingCell(IN, H, rngs=nnx.Rngs(0)), state_axes=axes)
    return _with_vars(rnn, ref=True) if refs else rnn

  with_refs, plain = layer(True), layer(False)
  _close(with_refs(_x(), seq_lengths=LENGTHS), plain(_x(), seq_lengths=LENGTHS))
  sown = nnx.state(with_refs, nnx.Intermediate)
  assert jax.tree.leaves(sown)[0].shape == (T, B, H)
  _close(sown, nnx.state(plain, nnx.Intermediate))
  captured = [nnx.capture(layer(refs), nnx.Intermediate)(_x(), seq_lengths=LENGTHS)[1]
              for refs in (True, False)]
  assert jax.tree.leaves(captured[0])[0].shape == (T, B, H)
  _close(*captured)


def test_broadcast_rngs_reach_a_cell_of_array_refs_as_flax():
  """A broadcast stream (one dropout mask per call) in a cell of array refs,
  under plain jax.jit: flax.nnx's RNN's outputs over the plain cell, call
  after call, and its step counter."""
  kw = dict(stream='recurrent_dropout')
  ours = _with_vars(nr.RNN(CountingDropoutCell(nnx.Rngs(0, recurrent_dropout=1), **kw),
                           broadcast_rngs='recurrent_dropout'), ref=True)
  theirs = nnx.RNN(_flax_cell(nnx.Rngs(0, recurrent_dropout=1), **kw),
                   broadcast_rngs='recurrent_dropout')
  x = jnp.ones((B, T, IN))
  call_o, call_t = jax.jit(lambda m: m(x)), nnx.jit(lambda m: m(x))  # each compiled once
  for _ in range(2):
    y_o, y_t = call_o(ours), call_t(theirs)
    _close(y_o, y_t)
    zeros = np.asarray(y_o == 0)
    assert (zeros == zeros[:, :1]).all() and zeros.any()  # one mask for every step
  assert int(ours.cell.steps[...]) == int(theirs.cell.steps[...]) == 2 * T


def test_packed_segments_in_a_cell_of_array_refs_start_from_the_default_carry():
  """segment_ids with an initial_carry, in a cell of array refs under plain
  jax.jit: a row's first segment goes on from the carry given, the next from
  zeros; flax.nnx's RNN run on each segment alone gives the same numbers."""
  cell = nnx.SimpleCell(IN, H, rngs=nnx.Rngs(0))
  x, h0 = _x(), _x((B, H), seed=1)
  ids = jnp.array([[1, 1, 2, 2, 2], [1, 2, 2, 2, 0], [1, 1, 1, 1, 1]])
  ours = _with_vars(nr.RNN(nnx.clone(cell)), ref=True)
  got = jax.jit(lambda m: m(x, segment_ids=ids, initial_carry=h0))(ours)
  cuts, seconds = (2, 1, 5), [int((np.asarray(ids[row]) == 2).sum()) for row in range(B)]

  @nnx.jit  # flax.nnx's runs on each segment alone, in one program
  def references(theirs):
    return [(theirs(x[row:row + 1, :cut], initial_carry=h0[row:row + 1]),
             theirs(x[row:row + 1, cut:cut + length]) if cut < T else None)
            for row, (cut, length) in enumerate(zip(cuts, seconds))]

  for row, (first, second) in enumerate(references(nnx.RNN(cell))):
    cut, length = cuts[row], seconds[row]
    _close(got[row:row + 1, :cut], first, atol=1e-5)
    if cut < T:
      _close(got[row:row + 1, cut:cut + length], second, atol=1e-5)


def test_a_shared_carry_leaf_in_a_cell_of_array_refs_steps_through_padding():
  """A carry leaf the rows share (of the batch's size), in a cell of array
  refs under plain jax.jit: the documented masking, step by step in Python."""
  x, lengths = _x(), jnp.array([5, 2, 0])
  cell = _SharedStepsCell(nnx.Rngs(0), B)
  start = cell.initialize_carry(x.shape[:1] + x.shape[2:])
  ours = _with_vars(nr.RNN(nnx.clone(cell)), ref=True)
  got = jax.jit(lambda m: m(x, seq_lengths=lengths, return_carry=True))(ours)
  _close(got, _shared_steps_by_hand(cell, x, lengths, start), atol=1e-6)


def test_a_calls_key_reaches_a_cell_of_array_refs():
  """A call's key (variational dropout and zoneout keys drawn from it) for a
  cell of array refs under plain jax.jit: the outputs and final carry of the
  plain layer under nnx.jit (zoneout is this package's alone)."""
  def make():
    return nr.RNN(nr.LSTMCell(IN, H, dropout_rate=0.5, zoneout_rate=0.5, rngs=nnx.Rngs(0)))

  def call(m, x, key):
    return m(x, seq_lengths=LENGTHS, return_carry=True, rngs=key)

  x = _x()
  got = jax.jit(call)(_with_vars(make(), ref=True), x, jax.random.key(3))
  want_call = nnx.jit(call)  # compiled once, for both keys
  want = want_call(make(), x, jax.random.key(3))
  _close(got, want)
  assert not np.allclose(want_call(make(), x, jax.random.key(4))[1], want[1])  # it mattered


class _TreeStatsCell(nnx.Module):
  """flax.nnx's SimpleCell and one Variable holding a tree: a step count and
  the outputs' running sum (a hijax Variable may hold a tree; an array ref not)."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.cell = nnx.SimpleCell(IN, H, rngs=rngs)
    self.stats = nnx.Variable({'steps': jnp.zeros((), jnp.int32), 'sum': jnp.zeros((H,))})

  def initialize_carry(self, input_shape, rngs=None):
    return self.cell.initialize_carry(input_shape, rngs)

  def __call__(self, h, x):
    h, y = self.cell(h, x)
    stats = self.stats.get_value()
    self.stats.set_value({'steps': stats['steps'] + 1, 'sum': stats['sum'] + y.sum(0)})
    return h, y


def test_a_hijax_variable_holding_a_tree_keeps_what_the_steps_wrote():
  """A hijax Variable holding a tree (flax.nnx's RNN fails over hijax
  Variables): the outputs and the tree flax.nnx's RNN leaves in the plain cell."""
  x = _x()
  ours = _with_vars(nr.RNN(_TreeStatsCell(nnx.Rngs(0))), hijax=True)
  theirs = nnx.RNN(_TreeStatsCell(nnx.Rngs(0)))
  _close(ours(x), theirs(x), atol=1e-6)
  _close(ours.cell.stats.get_value(), theirs.cell.stats.get_value(), atol=1e-5)
  assert int(ours.cell.stats.get_value()['steps']) == T


class _Sown(nnx.Intermediate):
  """A user's own Variable type for sown values (not one of flax's)."""


class _SowingOwnTypeCell(nnx.LSTMCell):
  def __call__(self, carry, x):
    carry, h = super().__call__(carry, x)
    self.sow(_Sown, 'h', h)
    return carry, h


class _TypeErrorCell(nnx.LSTMCell):
  """A cell whose step has a bug that raises a TypeError."""

  def __call__(self, carry, x):
    raise TypeError('the step of _TypeErrorCell has a bug')


@pytest.mark.filterwarnings('ignore:Using .Module.sow\\(\\). outside:DeprecationWarning')
def test_a_type_error_of_a_step_or_a_sown_value_of_a_users_type_as_flax():
  """A TypeError a cell's step raises is raised as flax.nnx's RNN raises it
  (not taken for a sown value); a value sown under a user's own Variable type
  is named in the fix as the user's code names it, not as nnx's, and the
  fix's state_axes then stacks it over time as in flax.nnx."""
  x = _x()
  for lib in (nnx, nr):
    with pytest.raises(TypeError, match='^the step of _TypeErrorCell has a bug'):
      lib.RNN(_TypeErrorCell(IN, H, rngs=nnx.Rngs(0)))(x)
  with pytest.raises(TypeError, match=re.escape(
      "state_axes=nnx.StateAxes({_Sown: 0, ...: nnx.Carry}); or return it in the step's "
      'output), got cell.h (_Sown) added by one step.')):
    nr.RNN(_SowingOwnTypeCell(IN, H, rngs=nnx.Rngs(0)))(x)
  axes = nnx.StateAxes({_Sown: 0, ...: nnx.Carry})
  ours, theirs = (lib.RNN(_SowingOwnTypeCell(IN, H, rngs=nnx.Rngs(0)), state_axes=axes)
                  for lib in (nr, nnx))
  _close(ours(x), theirs(x))
  _close(nnx.state(ours, _Sown), nnx.state(theirs, _Sown))


class _SowingInAList(nnx.Module):
  """A cell stepping through a sowing cell it holds in a list."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.layers = nnx.List([SowingCell(IN, H, rngs=rngs)])

  def initialize_carry(self, input_shape, rngs=None):
    return self.layers[0].initialize_carry(input_shape, rngs)

  def __call__(self, carry, x):
    return self.layers[0](carry, x)


@pytest.mark.filterwarnings('ignore:Using .Module.sow\\(\\). outside:DeprecationWarning')
def test_a_value_sown_in_a_list_is_named_by_its_index():
  """The sowing error names the value as Python reaches it, ``cell.layers[0].h``."""
  with pytest.raises(TypeError, match=re.escape(
      "or return it in the step's output), got cell.layers[0].h (Intermediate) added by one "
      'step.')):
    nr.RNN(_SowingInAList(nnx.Rngs(0)))(_x())


def test_a_carry_of_one_beam_warns_and_runs_as_in_flax():
  """A carry with a leading axis of size 1 the inputs lack (PyTorch's one-layer
  h_0 looks so) broadcasts as one beam in flax.nnx; ours gives flax.nnx's
  outputs and carry, and a warning (none for more beams)."""
  x, carry = _x(), _x((1, B, H), seed=1)
  ours, theirs = (lib.RNN(lib.SimpleCell(IN, H, rngs=nnx.Rngs(0))) for lib in (nr, nnx))
  with jax.numpy_rank_promotion('allow'):  # (B, H) + (1, B, H), in both
    with pytest.warns(UserWarning, match=r'RNN: `initial_carry` has leading axes of size 1 that '
                                         r'the inputs lack .*as in flax.nnx'):
      got = ours(x, initial_carry=carry, return_carry=True)
    want = theirs(x, initial_carry=carry, return_carry=True)
    with warnings.catch_warnings():
      warnings.simplefilter('error')
      ours(x, initial_carry=jnp.concatenate([carry, carry]))
      ours(x, initial_carry=carry[0])  # no beam axis: nothing to say
  assert got[1].shape == (1, T, B, H)  # flax's moveaxis of (time, 1, batch, H)
  _close(got, want)


def test_a_carry_of_beams_with_a_leaf_of_one_runs_as_in_flax_without_a_warning():
  """A carry whose leaves have beams, two for ``h``, and one leading axis of
  size 1 for a leaf the rows share (its shapes kept by the step): beams given
  on purpose, nothing to warn of; flax.nnx's outputs and carry."""
  x = _x()
  carry = {'h': _x((2, B, H), seed=1), 'steps': jnp.zeros((1, H))}
  ours, theirs = (lib.RNN(_SharedLeafCell(nnx.Rngs(0)), return_carry=True) for lib in (nr, nnx))
  with jax.numpy_rank_promotion('allow'), warnings.catch_warnings():
    warnings.simplefilter('error')
    _close(ours(x, initial_carry=carry), theirs(x, initial_carry=carry))


def test_a_scalar_seq_lengths_is_every_rows_length_as_in_flax():
  x = _x()
  ours = nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(0)), return_carry=True)
  theirs = nnx.RNN(nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0)), return_carry=True)
  carry, y = ours(x, seq_lengths=3)  # eager: the scalar is checked as given
  three, rows = jnp.array(3), jnp.full((B,), 3)

  @nnx.jit  # the rest in one program (the lengths are constants of the trace, as given)
  def others(ours, theirs, fused):
    return (theirs(x, seq_lengths=three),
            # Reversed too (where flax.nnx raises), and in the fused layer: each row of length 3.
            (ours(x, seq_lengths=3, reverse=True), ours(x, seq_lengths=rows, reverse=True)),
            (fused(x, seq_lengths=three), fused(x, seq_lengths=rows)))

  (carry_t, y_t), reversed_, fused_ = others(ours, theirs, nr.LSTM(IN, H, rngs=nnx.Rngs(0)))
  _close(carry, carry_t)
  _close(y[:, :3], y_t[:, :3])
  assert not np.asarray(y[:, 3:]).any()  # padding: zeros (ours), flax.nnx's runs on
  _close(*reversed_)
  _close(*fused_)


def test_seq_lengths_that_broadcast_to_the_batch_as_in_flax():
  # flax.nnx broadcasts lengths of shape (1,) in its carry gather and its
  # flip_sequences, and a scalar in flip_sequences over time-major inputs.
  from flax.nnx.nn.recurrent import flip_sequences as nnx_flip
  x, one = _x(), jnp.array([3])
  kw = dict(return_carry=True, reverse=True, keep_order=True)
  ours = nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(0)), **kw)
  theirs = nnx.RNN(nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0)), **kw)

  @nnx.jit
  def run(ours, theirs):
    return ours(x, seq_lengths=one), theirs(x, seq_lengths=one)

  (carry, y), (carry_t, y_t) = run(ours, theirs)
  _close(carry, carry_t)
  _close(y[:, :3], y_t[:, :3])
  assert not np.asarray(y[:, 3:]).any()
  # Lengths of shape () and (2, 1) for batch (2, 3) time-major, (1,) for batch (4,) batch-major.
  xs = jnp.arange(4 * 2 * 3).reshape(4, 2, 3)
  cases = ((jnp.array(3), 2, True), (jnp.array([2]), 1, False), (jnp.array([[3], [1]]), 2, True))
  for lengths, nb, tm in cases:  # each flip in one program (op by op, each op compiled its own)
    with jax.numpy_rank_promotion('allow'):  # flax's flip promotes the lengths' rank
      want = jax.jit(nnx_flip, static_argnums=(2, 3))(xs, lengths, nb, tm)
    np.testing.assert_array_equal(
      jax.jit(nr.flip_sequences, static_argnums=(2, 3))(xs, lengths, nb, tm), want)


def test_a_flax_cell_computing_in_a_lower_dtype_keeps_the_carrys_dtype():
  # flax.nnx.SimpleCell(dtype=bfloat16) returns a bfloat16 h for its float32
  # carry (flax.nnx's RNN fails on the scan's carry type): each step's carry is
  # cast back to the carry's dtype, as a loop over flax's cell that casts it.
  cell = nnx.SimpleCell(IN, H, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = _x()

  @nnx.jit  # the layer and the loop, in one program
  def both(cell):
    ours = nr.RNN(cell, return_carry=True)(x)  # unmasked: no where() promotes the carry
    h = jnp.zeros((B, H), jnp.float32)
    ys = []
    for t in range(T):
      h, y = cell(h, x[:, t])
      h = h.astype(jnp.float32)
      ys.append(y)
    return ours, (h, jnp.stack(ys, 1))

  (carry, y), (h, ys) = both(cell)
  assert carry.dtype == jnp.float32 and y.dtype == jnp.bfloat16
  _close(carry, h, atol=0)
  _close(y.astype(jnp.float32), ys.astype(jnp.float32), atol=0)


def test_float_seq_lengths_are_lengths():
  # flax.nnx runs with float lengths where it ignores them (no carry, forward),
  # so code passes them (the sum of a float mask); here they are the lengths.
  x = _x()
  lengths = jnp.array([5, 2, 3])
  ours = nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0)))
  theirs = nnx.RNN(nnx.GRUCell(IN, H, rngs=nnx.Rngs(0)))
  nnx.update(ours, nnx.state(theirs, nnx.Param))
  fused = nr.GRU(IN, H, rngs=nnx.Rngs(0))
  floats = lengths.astype(jnp.float32)  # as the sum of a float mask is
  # Eager (their values checked): the float lengths under test.
  y, y_fused = ours(x, seq_lengths=floats), fused(x, seq_lengths=floats)
  call = nnx.jit(lambda m, n: m(x, seq_lengths=n))
  # Under jit (unchecked) a length computed a rounding error off is that length.
  off = floats + jnp.array([-4e-7, 2e-7, -2e-7])
  assert bool((off != lengths).any())

  @nnx.jit  # the integer-length references, in one program
  def references(theirs, fused):
    return theirs(x, seq_lengths=lengths), fused(x, seq_lengths=lengths)

  y_t, y_fused_int = references(theirs, fused)
  valid = (np.arange(T)[None] < np.asarray(lengths)[:, None])[..., None]
  _close(np.where(valid, y, 0), np.where(valid, y_t, 0))
  assert not np.where(valid, 0, y).any()  # zeros at padding, as with int lengths
  _close(y_fused, y_fused_int)
  _close(call(ours, off), y)
  _close(call(fused, off), y_fused_int)


def test_lengths_past_the_time_axis_act_as_it_as_in_flax():
  # Code that cuts its inputs to a maximum length and keeps each row's own
  # length runs in flax.nnx, each such row to the end; here too, eagerly
  # (concrete lengths are checked for sign only), in the scan and the fused layer.
  x = _x()
  lengths = jnp.array([T + 4, T, T + 1])
  theirs = nnx.RNN(nnx.GRUCell(IN, H, rngs=nnx.Rngs(0)), return_carry=True)
  ours = nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0)), return_carry=True)
  fused = nr.GRU(IN, H, return_carry=True, rngs=nnx.Rngs(0))
  nnx.update(ours, nnx.state(theirs, nnx.Param))
  nnx.update(fused.forward[0], nnx.state(theirs.cell, nnx.Param))
  expected = nnx.jit(lambda m: m(x, seq_lengths=lengths))(theirs)  # the reference: one program
  _close(ours(x, seq_lengths=lengths), expected)
  _close(fused(x, seq_lengths=lengths), expected)
  # The gradient through such a row's carry too: flax.nnx's is lost (its carry
  # is gathered at index length - 1, out of bounds, whose gradient is dropped),
  # so the reference is flax.nnx with the lengths cut to the time axis.
  zeros = jnp.zeros((x.shape[0], H))

  def carry_sum(model, x, lengths):
    return model(x, seq_lengths=lengths, initial_carry=zeros)[0].sum()

  grad = nnx.grad(carry_sum, argnums=(0, 1))

  @nnx.jit  # every gradient in one program; the lengths concrete in it, as given to grad eagerly
  def grads(theirs, ours, fused):
    return (grad(theirs, x, jnp.minimum(lengths, T)), grad(theirs, x, lengths)[1],
            [grad(model, x, lengths) for model in (ours, fused)])

  (g_theirs, dx_theirs), dx_lost, ((g_ours, dx_ours), (_, dx_fused)) = grads(theirs, ours, fused)
  assert not np.allclose(dx_lost, dx_theirs)  # flax.nnx's loss
  for dx in (dx_ours, dx_fused):
    _close(dx, dx_theirs)
  g_ours = nnx.to_pure_dict(g_ours)
  del g_ours['cell']['bias_hn']  # nr.GRUCell's one more parameter
  _close(g_ours, nnx.to_pure_dict(g_theirs))


def test_broadcast_rngs_gives_one_mask_per_call_as_flax():
  kw = dict(stream='recurrent_dropout')
  ours = nr.RNN(CountingDropoutCell(nnx.Rngs(0, recurrent_dropout=1), **kw),
                broadcast_rngs='recurrent_dropout')
  theirs = nnx.RNN(_flax_cell(nnx.Rngs(0, recurrent_dropout=1), **kw),
                   broadcast_rngs='recurrent_dropout')
  x = jnp.ones((B, T, IN))
  call = nnx.jit(lambda rnn: rnn(x))  # one program per library; it carries the state out
  masks = []
  for _ in range(2):
    y_o, y_t = call(ours), call(theirs)
    _close(y_o, y_t)
    zeros = np.asarray(y_o == 0)
    assert (zeros == zeros[:, :1]).all() and zeros.any()  # one mask for every step
    masks.append(zeros[:, 0])
  assert not np.array_equal(*masks)  # still new per call
  assert int(ours.cell.steps[...]) == 2 * T


def test_state_axes_as_flax():
  # Broadcast state is read-only in the scan: the counter's changes are dropped, as in flax.
  ours = nr.RNN(CountingDropoutCell(nnx.Rngs(0, dropout=1), rate=0.0),
                state_axes=nnx.StateAxes({nnx.Param: None, nnx.RngState: nnx.Carry,
                                          ...: None}))
  theirs = nnx.RNN(_flax_cell(nnx.Rngs(0, dropout=1), rate=0.0),
                   state_axes=nnx.StateAxes({nnx.Param: None, nnx.RngState: nnx.Carry,
                                             ...: None}))
  x = _x()
  _close(ours(x), theirs(x))
  assert int(ours.cell.steps[...]) == int(theirs.cell.steps[...]) == 0
  with pytest.raises(TypeError, match=m('RNN: `state_axes` expected None or a mapping',
                                        'got int')):
    nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0)), state_axes=0)
  # The attribute, as flax.nnx's: the default (also for an empty mapping) spelled out,
  # under which the counter's changes persist.
  for axes in (None, {}):
    counted = nr.RNN(CountingDropoutCell(nnx.Rngs(0, dropout=1), rate=0.0), state_axes=axes)
    flax_default = nnx.RNN(_flax_cell(nnx.Rngs(0, dropout=1), rate=0.0), state_axes=axes)
    assert repr(counted.state_axes) == repr(flax_default.state_axes)
    counted(x)
    assert int(counted.cell.steps[...]) == T


class ParamWritingCell(nr.SimpleCell):
  """Writes to its own parameter at every step (an unusual cell, a real contract)."""

  def __call__(self, carry, x):
    self.dense_i.bias[...] += 1.0
    return super().__call__(carry, x)


@pytest.mark.parametrize('remat', [False, True])
def test_a_cell_writing_its_parameters_keeps_the_writes(remat):
  ours = nr.RNN(ParamWritingCell(IN, H, rngs=nnx.Rngs(0)), remat=remat)
  theirs = nnx.RNN(ParamWritingCell(IN, H, rngs=nnx.Rngs(0)))
  x = _x()
  _close(ours(x), theirs(x), atol=1e-5)
  np.testing.assert_array_equal(ours.cell.dense_i.bias[...], np.full((H,), float(T)))
  _close(nnx.state(ours.cell), nnx.state(theirs.cell))


# -- 4. flax.nnx-style custom cells, rngs arguments ------------------------------------
def test_custom_cell_with_required_rngs_in_rnn_and_bidirectional():
  cell_o = CountingDropoutCell(nnx.Rngs(0, dropout=1), rate=0.0)
  cell_t = _flax_cell(nnx.Rngs(0, dropout=1), rate=0.0)
  x = _x()
  carry = cell_o.initialize_carry((B, IN), None)

  def runs(lib):  # one program per library: RNN's three calls and Bidirectional's
    @nnx.jit
    def run(cell, back):
      outs = [lib.RNN(cell)(x, **kw)[:2, :2] for kw in (dict(), dict(seq_lengths=LENGTHS))]
      outs.append(lib.RNN(cell)(x, initial_carry=carry))
      outs.append(lib.Bidirectional(lib.RNN(cell), lib.RNN(back), rngs=nnx.Rngs(5))(x))
      return outs

    return run

  _close(runs(nr)(cell_o, CountingDropoutCell(nnx.Rngs(2), rate=0.0)),
         runs(nnx)(cell_t, _flax_cell(nnx.Rngs(2), rate=0.0)))


def test_rngs_arguments_hold_a_stream_only_when_a_cell_may_draw():
  builtin = nr.GRUCell(IN, H, rngs=nnx.Rngs(0))
  for rngs in (True, nnx.Rngs(0), nnx.RngStream(0, tag='carry'), False):
    rnn = nr.RNN(builtin, rngs=rngs)
    assert not jax.tree.leaves(nnx.state(rnn, nnx.RngState))  # checkpoint-safe
    bi = nr.Bidirectional(nr.RNN(builtin), nr.RNN(builtin), rngs=rngs)
    assert not jax.tree.leaves(nnx.state(bi, nnx.RngState))
  custom = CountingDropoutCell(nnx.Rngs(0), rate=0.0)
  rnn = nr.RNN(custom, rngs=nnx.Rngs(3))
  assert rnn.rngs is not None  # flax.nnx's stream: the custom cell's initialize_carry gets it
  assert nr.RNN(custom, rngs=False).rngs is None
  # A built-in cell with a random carry_init draws from the stored stream, as in flax.nnx.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    noisy = nr.GRUCell(IN, H, carry_init=jax.nn.initializers.normal(), rngs=nnx.Rngs(0))
    flax_noisy = nnx.GRUCell(IN, H, carry_init=jax.nn.initializers.normal(), rngs=nnx.Rngs(0))
  ours, theirs = nr.RNN(noisy, rngs=nnx.Rngs(4)), nnx.RNN(flax_noisy, rngs=nnx.Rngs(4))
  x = _x()
  ours_1, theirs_1 = ours(x, return_carry=True)[0], theirs(x, return_carry=True)[0]
  _close(ours_1, theirs_1, atol=1e-5)  # flax.nnx's stream, drawn as flax.nnx draws it
  ours_2 = ours(x, return_carry=True)[0]
  assert not np.allclose(ours_1, ours_2)  # a new random carry each call
  for bad in (3, 'carry'):
    with pytest.raises(TypeError, match=m('RNN: `rngs` expected True, False, an nnx.Rngs',
                                          f'got {type(bad).__name__}')):
      nr.RNN(builtin, rngs=bad)
  with pytest.raises(TypeError, match=m('Bidirectional: `rngs` expected True, False')):
    nr.Bidirectional(nr.RNN(builtin), nr.RNN(builtin), rngs=1.5)


def test_bidirectional_given_a_stream_draws_flax_nnx_carries():
  """flax.nnx's Bidirectional keeps a given RngStream itself and draws its
  random carries from it: ours draws the same numbers, call after call, and
  two layers given one stream draw in turn from it, as flax.nnx's do."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    make = lambda lib, seed: lib.RNN(lib.SimpleCell(  # noqa: E731
      IN, H, carry_init=RANDOM_CARRY, rngs=nnx.Rngs(seed)))
    stream_o, stream_t = nnx.RngStream(11, tag='carry'), nnx.RngStream(11, tag='carry')
    stream_o(), stream_t()  # a stream that has drawn before
    ours = [nr.Bidirectional(make(nr, s), make(nr, s + 1), rngs=stream_o) for s in (0, 2)]
    theirs = [nnx.Bidirectional(make(nnx, s), make(nnx, s + 1), rngs=stream_t) for s in (0, 2)]
  x = _x()
  call = nnx.jit(lambda *libs: [[bi(x) for bi in bis] for bis in libs])  # both libraries'
  first, first_t = call(ours, theirs)
  _close(first, first_t, atol=1e-5)
  second, second_t = call(ours, theirs)
  _close(second, second_t, atol=1e-5)  # the second call's draws too
  assert not np.allclose(first[0], second[0])
  assert not np.allclose(first[0], first[1])  # the two layers' carries differ
  assert int(stream_o.count[...]) == int(stream_t.count[...]) == 9  # 1 + 2 calls x 2 x 2


def test_call_rngs_draw_the_carry_as_flax():
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    ours = nr.RNN(nr.LSTMCell(IN, H, carry_init=jax.nn.initializers.normal(),
                              rngs=nnx.Rngs(0)), rngs=False)
    theirs = nnx.RNN(nnx.LSTMCell(IN, H, carry_init=jax.nn.initializers.normal(),
                                  rngs=nnx.Rngs(0)), rngs=False)
  x = _x()
  _close(ours(x, rngs=nnx.Rngs(carry=7), return_carry=True),
         theirs(x, rngs=nnx.Rngs(carry=7), return_carry=True), atol=1e-5)


@pytest.mark.parametrize('carry_init', [None, RANDOM_CARRY])
def test_rnn_built_without_a_stream_leaves_a_keep_rngs_cells_carry_to_its_own_stream(carry_init):
  """flax.nnx's ``RNN(rngs=False)`` passes ``initialize_carry`` no RNG, so a
  ``keep_rngs`` cell draws its carry (random, or zeros) from its own stream:
  ours runs it so and draws the same numbers, where it must not ask for the
  call's ``rngs``."""
  x = _x()

  def build(lib):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return lib.RNN(lib.LSTMCell(IN, H, keep_rngs=True, carry_init=carry_init,
                                  rngs=nnx.Rngs(0)), rngs=False, return_carry=True)

  ours, theirs = build(nr), build(nnx)
  call = nnx.jit(lambda ours, theirs: (ours(x), theirs(x)))  # both in one program
  for _ in range(2):  # the cells' streams advance alike
    _close(*call(ours, theirs), atol=1e-5)
  _close(nnx.state(ours, nnx.RngState), nnx.state(theirs, nnx.RngState), atol=0)


def test_rnn_built_without_a_stream_runs_a_user_cell_whose_carry_needs_none():
  """A user's cell whose ``initialize_carry`` takes ``rngs`` and draws nothing
  runs under ``RNN(rngs=False)`` with no RNG at the call, as in flax.nnx."""
  x = _x()
  ours = nr.RNN(CountingDropoutCell(nnx.Rngs(0), rate=0.0), rngs=False)
  theirs = nnx.RNN(CountingDropoutCell(nnx.Rngs(0), rate=0.0), rngs=False)
  _close(ours(x), theirs(x), atol=1e-5)


class _RandomCarryCell(CountingDropoutCell):
  """flax.nnx's style: a random initial carry from the RNG it is handed."""

  def initialize_carry(self, input_shape, rngs):
    return (jax.random.uniform(rngs(), (*input_shape[:-1], H)),) * 2


def test_a_flax_style_cell_without_initialize_carry_fails_as_in_flax():
  """A cell that overrides __call__ and leaves initialize_carry to the base:
  flax.nnx's base raises NotImplementedError from initialize_carry and from
  the RNN that needs it; ours raises one too (and a TypeError, our rule for
  a wrong cell), saying what to define."""
  def make(lib):
    class NoCarry(lib.RNNCellBase):
      def __call__(self, carry, inputs):
        return carry + inputs, carry + inputs
    return NoCarry()

  x = jnp.ones((2, 4, 3))
  message = ("NoCarry overrides __call__ but not initialize_carry: define "
             "initialize_carry(input_shape, rngs=None, carry_init=None), as flax.nnx's "
             "RNNCellBase requires")
  for lib in (nnx, nr):
    for call in (lambda c: c.initialize_carry((2, 3)), lambda c, lib=lib: lib.RNN(c)(x)):
      with pytest.raises(NotImplementedError) as raised:
        call(make(lib))
      if lib is nr:
        assert isinstance(raised.value, TypeError)
        assert str(raised.value).startswith(message)


@pytest.mark.parametrize('cell_type', [CountingDropoutCell, _RandomCarryCell])
def test_a_cell_put_into_an_rnn_that_kept_no_stream(cell_type):
  """An RNN built around a cell whose carry needs no RNG keeps no stream
  (flax.nnx keeps one always). A user's cell put in its place later gets
  one from the call; without it, a carry that draws nothing runs as in
  flax.nnx, and one that draws is a ValueError, never a carry built from
  ``None``."""
  x = _x()
  layers = {}
  for lib in (nr, nnx):
    layer = lib.RNN(lib.GRUCell(IN, H, rngs=nnx.Rngs(0)))
    layer.cell = (cell_type(nnx.Rngs(0), rate=0.0) if lib is nr
                  else _flax_cell(nnx.Rngs(0), cell_type, rate=0.0))
    layers[lib] = layer
  _close(layers[nr](x, rngs=nnx.Rngs(7)), layers[nnx](x, rngs=nnx.Rngs(7)))
  if cell_type is CountingDropoutCell:
    _close(layers[nr](x), layers[nnx](x))
  else:
    with pytest.raises(ValueError, match=m("RNN: `rngs` expected an nnx.Rngs or nnx.RngStream "
                                           "in the call: the cell's initialize_carry "
                                           '(_RandomCarryCell) draws from one', 'got none')):
      layers[nr](x)


def test_packed_segments_without_an_initial_carry_start_from_the_calls_one_random_carry():
  """A random ``carry_init``, no ``initial_carry``: every packed segment starts
  from the call's default carry, drawn once as flax.nnx's ``RNN`` draws it
  for one unpacked sequence (the same keys, no more)."""
  seg = _x((1, 3, IN))
  x, ids = jnp.concatenate([seg, seg], axis=1), jnp.array([[1, 1, 1, 2, 2, 2]])

  def build(lib):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return lib.RNN(lib.LSTMCell(IN, H, carry_init=RANDOM_CARRY, rngs=nnx.Rngs(0)),
                     rngs=nnx.Rngs(5))

  ours, theirs = build(nr), build(nnx)
  y, y_t = nnx.jit(lambda ours, theirs: (ours(x, segment_ids=ids), theirs(seg)))(ours, theirs)
  _close(y, jnp.concatenate([y_t, y_t], axis=1), atol=1e-5)
  assert int(ours.rngs.count[...]) == int(theirs.rngs.count[...]) == 2  # c and h


def test_call_rngs_closed_over_by_jit_fail_for_a_random_carry_as_flax():
  """An ``nnx.Rngs`` a jitted function closes over cannot be drawn in its
  trace: for a carry that draws from it, flax's ``TraceContextError``, as
  flax.nnx's ``RNN`` raises (not a message that no RNG was given)."""
  x = _x()
  for lib in (nr, nnx):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      rnn = lib.RNN(lib.LSTMCell(IN, H, carry_init=RANDOM_CARRY, rngs=nnx.Rngs(0)), rngs=False)
    closed = nnx.Rngs(carry=3)
    with pytest.raises(flax.errors.TraceContextError, match='from a different trace level'):
      nnx.jit(lambda rnn: rnn(x, rngs=closed))(rnn)  # noqa: B023 -- called at once


def test_bidirectional_keeps_a_given_stream_when_a_direction_draws_dropout():
  """With a direction drawing dropout from the call's RNG, ``rngs=True`` keeps
  no stream (each RNN uses its own), but a stream given is kept and drawn."""
  stream = nnx.RngStream(11, tag='carry')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    bi = nr.Bidirectional(
      nr.RNN(nr.GRUCell(IN, H, dropout_rate=0.5, rngs=nnx.Rngs(0))),
      nr.RNN(nr.GRUCell(IN, H, carry_init=RANDOM_CARRY, rngs=nnx.Rngs(1))), rngs=stream)
  assert bi.rngs is stream
  x = _x()
  nnx.jit(lambda bi: bi(x))(bi)  # (nnx.jit carries the stream's update out)
  assert int(stream.count[...]) > 0


def test_bidirectional_passes_call_rngs_whole_to_directions_that_draw_dropout():
  """An ``nnx.Rngs`` given at the call, one direction drawing dropout from it:
  both directions get the ``Rngs`` itself (dropout from its ``dropout``
  stream), in turn, as each RNN alone given it; not its ``carry`` stream."""
  def build():
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return nr.Bidirectional(
        nr.RNN(nr.GRUCell(IN, H, dropout_rate=0.5, rngs=nnx.Rngs(0))),
        nr.RNN(nr.GRUCell(IN, H, carry_init=RANDOM_CARRY, rngs=nnx.Rngs(1))))

  x = _x()
  bi, alone = build(), build()
  rngs_bi, rngs_alone = nnx.Rngs(dropout=1, carry=2), nnx.Rngs(dropout=1, carry=2)
  y = bi(x, rngs=rngs_bi)
  y_f = alone.forward_rnn(x, rngs=rngs_alone)
  y_b = alone.backward_rnn(x, reverse=True, keep_order=True, rngs=rngs_alone)
  _close(y, jnp.concatenate([y_f, y_b], axis=-1), atol=1e-6)
  assert _count(rngs_bi, 'dropout') == _count(rngs_alone, 'dropout') > 0


def _count(rngs, stream='default'):
  return int(rngs[stream].count[...])


@pytest.mark.parametrize('name', ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell'])
def test_shared_rngs_advance_as_in_flax(name):
  """Everything built or run after our layers from the same Rngs gets flax's numbers."""
  x = _x()

  def build(lib):
    rngs = nnx.Rngs(0)
    cell = getattr(lib, name)(IN, H, rngs=rngs)
    rnn = lib.RNN(cell, rngs=rngs)
    lib.Bidirectional(lib.RNN(getattr(lib, name)(IN, H, rngs=rngs)),  # draws from rngs too
                      lib.RNN(getattr(lib, name)(IN, H, rngs=rngs)), rngs=rngs)
    head = nnx.Linear(H, 2, rngs=rngs)
    built = _count(rngs)
    # flax forks a call's Rngs once per RNN call and draws one key per carry
    # array from a given stream, zeros or not: a dropout mask drawn next matches.
    rnn(x, rngs=rngs)
    carry = cell.initialize_carry((B, IN), rngs)
    mask = nnx.Dropout(0.5)(jnp.ones((B, H)), rngs=rngs)
    return cell, head, built, carry, mask, _count(rngs)

  cell_o, head_o, built_o, carry_o, mask_o, count_o = build(nr)
  cell_t, head_t, built_t, carry_t, mask_t, count_t = build(nnx)
  assert (built_o, count_o) == (built_t, count_t)
  _close(head_o.kernel[...], head_t.kernel[...])
  _close(carry_o, carry_t)
  _close(mask_o, mask_t)
  if name == 'GRUCell':  # our GRU's b_hn (flax.nnx has none) takes no key from the stream
    np.testing.assert_array_equal(cell_o.bias_hn[...], 0.0)
    state_t = nnx.state(cell_t, nnx.Param)
    nnx.update(cell_o, state_t)
    _close(nnx.state(cell_o, nnx.Param)['dense_h'], state_t['dense_h'])


def test_call_rngs_closed_over_by_jit_when_the_carry_needs_none():
  rnn = nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0)))
  rngs, x = nnx.Rngs(0), _x()
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x, rngs=rngs))(rnn, x), rnn(x))
  assert _count(rngs) == 0  # not drawn: the trace cannot advance it (flax.nnx raises)


def test_gru_bias_hn_with_a_random_init_differs_between_cells():
  rngs = nnx.Rngs(0)
  normal = jax.nn.initializers.normal(1.0)
  a, b = (nr.GRUCell(IN, H, bias_init=normal, rngs=rngs) for _ in range(2))
  assert not np.allclose(a.bias_hn[...], b.bias_hn[...])
  assert not np.allclose(a.bias_hn[...], a.dense_i.bias[...][2 * H:])


@pytest.mark.parametrize('unroll', [True, False, 3, 0])
def test_unroll_takes_a_bool_and_zero_as_flax(unroll):
  # unroll=0 unrolls every step in jax.lax.scan, which flax.nnx passes it to.
  rngs_o, rngs_t = nnx.Rngs(0), nnx.Rngs(0)
  ours = nr.RNN(nr.LSTMCell(IN, H, rngs=rngs_o), unroll=unroll)
  theirs = nnx.RNN(nnx.LSTMCell(IN, H, rngs=rngs_t), unroll=unroll)
  x = _x()
  _close(ours(x, return_carry=True), theirs(x, return_carry=True), atol=1e-6)
  with pytest.raises(ValueError, match=m('RNN: `unroll` expected a bool or a non-negative int',
                                         'got -1')):
    nr.RNN(nr.LSTMCell(IN, H, rngs=rngs_o), unroll=-1)


def _scan_unrolls(module, x):
  """The ``unroll`` of each ``scan`` in the program of ``module(x)``."""
  graphdef, state = nnx.split(module)
  jaxpr = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x).jaxpr
  return [e.params['unroll'] for e in equations(jaxpr) if e.primitive.name == 'scan']


def test_unroll_reaches_the_scan_as_in_flax():
  # unroll changes no number (the test above): the scan's own parameter shows it arrives.
  # True unrolls every step (jax's scan reads it so, not as the int 1); a NumPy
  # int (a size read off an array) is an int, as jax's scan takes it.
  x = _x()
  for unroll, expected in ((3, 3), (True, x.shape[1]), (np.int64(2), 2)):
    ours = nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0)), unroll=unroll)
    theirs = nnx.RNN(nnx.GRUCell(IN, H, rngs=nnx.Rngs(0)), unroll=unroll)
    assert _scan_unrolls(ours, x) == _scan_unrolls(theirs, x) == [expected]
  # A NumPy bool is taken as the bool it holds (flax.nnx passes np.True_ on, and
  # jax's scan reads it as the int 1, unrolling nothing; a deliberate difference
  # that changes no number).
  for unroll, expected in ((np.bool_(True), x.shape[1]), (np.bool_(False), 1)):
    ours = nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0)), unroll=unroll)
    assert _scan_unrolls(ours, x) == [expected]


class _NoInitCell(nnx.Module):
  """A cell as flax.nnx allows it: no initialize_carry, so the call passes the carry."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(IN + H, H, rngs=rngs)

  @property
  def num_feature_axes(self):
    return 1

  def __call__(self, h, x):
    h = jnp.tanh(self.linear(jnp.concatenate([x, h], -1)))
    return h, h


def test_a_cell_without_initialize_carry_runs_with_an_initial_carry():
  ours, theirs = nr.RNN(_NoInitCell(nnx.Rngs(0))), nnx.RNN(_NoInitCell(nnx.Rngs(0)))
  x, h0 = _x(), jnp.ones((B, H))
  _close(ours(x, initial_carry=h0), theirs(x, initial_carry=h0))
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected a carry, since the cell '
                                         '_NoInitCell has no initialize_carry', 'got None')):
    ours(x)


class _SelfRatedCell(nnx.Module):
  """A cell in flax's style whose own attributes bear this package's option
  names: ``dropout_rate`` (its ``nnx.Dropout``), ``zoneout_rate`` and
  ``deterministic`` (its own zoneout, from its own stream); a random carry."""

  def __init__(self, rngs, rate=0.3):
    self.inner = nnx.SimpleCell(IN, H, rngs=rngs)  # the step itself: any cell
    self.dropout_rate = self.zoneout_rate = rate
    self.deterministic = False
    self.drop = nnx.Dropout(rate, rngs=rngs)
    self.noise = nnx.Rngs(zone=7)

  @property
  def num_feature_axes(self):
    return 1

  def initialize_carry(self, input_shape, rngs):
    return jax.random.normal(rngs(), input_shape[:-1] + (H,))

  def __call__(self, h, x):
    new, y = self.inner(h, x)
    keep = jax.random.bernoulli(self.noise.zone(), self.zoneout_rate, new.shape)
    return jnp.where(keep, h, new), self.drop(y)


def test_a_cells_own_rate_attributes_are_its_own_business():
  """``RNN`` passed such a cell this package's options (``rngs=`` per step:
  a TypeError) and ``Bidirectional`` kept no carry stream for it (other
  carries than flax.nnx's): only this package's cells take them."""
  x = _x()

  def build(lib, layer):
    rnns = [lib.RNN(_SelfRatedCell(nnx.Rngs(s))) for s in (0, 1)]
    return rnns[0] if layer == 'RNN' else lib.Bidirectional(*rnns)

  for layer in ('RNN', 'Bidirectional'):
    ours, theirs = build(nr, layer), build(nnx, layer)
    _close(ours(x), theirs(x), atol=1e-5)  # the stored streams
    _close(ours(x, rngs=nnx.Rngs(3)), theirs(x, rngs=nnx.Rngs(3)), atol=1e-5)
    _close(nnx.state(ours, nnx.RngState), nnx.state(theirs, nnx.RngState), atol=0)


class _CountingCell(_NoInitCell):
  """flax's style, with an integer step counter in the carry and an
  ``initialize_carry`` written for one batch axis and a float carry."""

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros((input_shape[0], H)), jnp.zeros((input_shape[0],))

  def __call__(self, carry, x):
    h, steps = carry
    new, y = super().__call__(h, x)
    return (new, steps + 1), y


def test_an_initial_carry_its_cells_initialize_carry_does_not_describe():
  """flax.nnx never calls ``initialize_carry`` when the carry is given: a carry
  the cell's step keeps passes the check (two batch axes, an int32 counter);
  one it does not keep is refused with the check's message."""
  for x in (_x(), _x((2, B, T, IN))):
    batch = x.shape[:-2]
    carry = (jnp.ones(batch + (H,)), jnp.zeros(batch, jnp.int32))
    lengths = jnp.full(batch, T)
    ours, theirs = nr.RNN(_CountingCell(nnx.Rngs(0))), nnx.RNN(_CountingCell(nnx.Rngs(0)))

    @nnx.jit  # both libraries' in one program (the carry and lengths as given: constants)
    def runs(ours, theirs, x=x, carry=carry, lengths=lengths):
      return (ours(x, initial_carry=carry, seq_lengths=lengths, return_carry=True),
              theirs(x, initial_carry=carry, return_carry=True))

    out_o, out_t = runs(ours, theirs)
    _close(out_o, out_t)
    assert out_o[0][1].dtype == jnp.int32
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected leaf shapes',
                                         f'got [({B}, {H + 1}), ({B},)]')):
    ours(_x(), initial_carry=(jnp.ones((B, H + 1)), jnp.zeros((B,), jnp.int32)))


def test_a_given_carry_whose_step_changes_its_structure_or_shapes_is_refused():
  """A carry that fails the check passes only when one step keeps it: a list
  the step returns as a tuple, or a leaf the step broadcasts to the cell's
  shape, is refused with the check's message (flax.nnx's scan fails with
  JAX's carry-type TypeError)."""
  x, cell = _x(), _CountingCell(nnx.Rngs(0))
  h, steps = jnp.ones((B, H)), jnp.zeros((B,), jnp.int32)
  with pytest.raises(ValueError, match='pytree structure'):  # flax's own
    nnx.RNN(cell)(x, initial_carry=[h, steps])
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected a pytree with structure',
                                         'got structure')):
    nr.RNN(cell)(x, initial_carry=[h, steps])
  # One row of h for every row: the step broadcasts it to the batch's rows.
  cell = _AddingCell(nnx.Rngs(0))
  with pytest.raises(TypeError, match='carry input and carry output'):
    nnx.RNN(cell)(x, initial_carry=h[:1])
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected leaf shapes',
                                         f'got [(1, {H})]')):
    nr.RNN(cell)(x, initial_carry=h[:1])


class _AddingCell(_NoInitCell):
  """flax's style: ``h`` added to the input's projection (so it broadcasts)."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(IN, H, rngs=rngs)

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros((*input_shape[:-1], H))

  def __call__(self, h, x):
    h = jnp.tanh(self.linear(x) + h)
    return h, h


class _SharedCounterCell(nnx.Module):
  """flax.nnx's style, with a carry leaf shared by every row (a step counter of
  shape ``()``); with ``scalar_output``, a per-step output of shape ``()``
  besides ``h``."""

  num_feature_axes = 1

  def __init__(self, rngs, scalar_output=False):
    self.dense = nnx.Linear(IN + H, H, rngs=rngs)
    self.scalar_output = scalar_output

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros(input_shape[:-1] + (H,)), jnp.zeros((), jnp.int32)

  def __call__(self, carry, x):
    h, t = carry
    h = jnp.tanh(self.dense(jnp.concatenate([x, h], -1))) + 0.1 * t
    return (h, t + 1), ((h, h.mean()) if self.scalar_output else h)


def test_a_carry_leaf_shared_by_the_rows_runs_with_seq_lengths_as_flax():
  """flax.nnx masks nothing inside its scan, so a carry leaf without the batch
  axes (a step counter) runs with ``seq_lengths``: it goes on through every
  step; the per-row parts are masked. (The carry selection failed on it with a
  scan carry-type error, and zeroed a time-major ``()`` output into ``(B,)``.)"""
  x = _x()
  ours, theirs = nr.RNN(_SharedCounterCell(nnx.Rngs(0))), nnx.RNN(_SharedCounterCell(nnx.Rngs(0)))
  valid = (np.arange(T)[None] < np.asarray(LENGTHS)[:, None])[..., None]
  xt = jnp.swapaxes(x, 0, 1)
  seg = jnp.array([[1, 1, 2, 2, 2], [1, 2, 0, 0, 0], [0, 0, 0, 0, 0]])
  start = (jnp.zeros((B, H)), 2)  # the counter given as a Python number (closed over: as given)

  @nnx.jit  # every call in one program (the lengths and segment ids: constants, as given)
  def runs(ours, theirs, ours_tm, theirs_tm):
    return (ours(x, seq_lengths=LENGTHS, return_carry=True), theirs(x, seq_lengths=LENGTHS),
            (ours_tm(xt, seq_lengths=LENGTHS), theirs_tm(xt)),
            ours(x, segment_ids=seg, return_carry=True)[0][1],
            (ours(x, initial_carry=start, return_carry=True),
             theirs(x, initial_carry=start, return_carry=True)))

  ((h, t), y), y_t, (ys, ys_t), t_packed, ((carry_o, y_o), (carry_t, y_t2)) = runs(
    ours, theirs, *(lib.RNN(_SharedCounterCell(nnx.Rngs(0), True), time_major=True)
                    for lib in (nr, nnx)))
  _close(y, np.where(valid, y_t, 0))
  assert t.shape == () and int(t) == T
  _close(h[0], y_t[0, -1])  # full row: its last step
  # Time-major: a () output per step stays (T,), as flax.nnx returns it.
  assert ys[1].shape == ys_t[1].shape == (T,)
  _close(ys[0], np.where(np.swapaxes(valid, 0, 1), ys_t[0], 0))
  # Packed sequences: the counter is not reset at segment starts.
  assert int(t_packed) == T
  # The counter given as a Python number, as flax.nnx takes it (a leaf of shape ()).
  (_, t_o), (_, t_t) = carry_o, carry_t
  _close(y_o, y_t2)
  assert int(t_o) == int(t_t) == T + 2 and t_o.dtype == t_t.dtype


class _NoInitSubclass(_NoInitCell, nr.RNNCellBase):
  """That cell on this package's base, in flax's style: no sizes, and no
  ``initialize_carry`` of its own (the base's needs sizes)."""


def test_a_base_subclass_without_sizes_runs_with_an_initial_carry():
  """Its carry was checked against the base's ``initialize_carry``, which
  needs sizes it does not have ("the cell has no hidden_features")."""
  x, h0 = _x(), jnp.ones((B, H))
  theirs = nnx.RNN(_NoInitSubclass(nnx.Rngs(0)))  # flax.nnx's RNN over the same cell
  _close(nr.RNN(_NoInitSubclass(nnx.Rngs(0)))(x, initial_carry=h0),
         theirs(x, initial_carry=h0))


@pytest.mark.parametrize('carry_init', [None, RANDOM_CARRY])
def test_keep_rngs_cells_draw_their_carry_from_the_layers_stream_as_flax(carry_init):
  """flax.nnx's ``RNN`` and ``Bidirectional`` pass their own stream to
  ``initialize_carry``, so a ``keep_rngs`` cell's stream is never drawn."""
  x = _x()

  def build(lib, layer):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      rnns = [lib.RNN(lib.LSTMCell(IN, H, keep_rngs=True, carry_init=carry_init,
                                   rngs=nnx.Rngs(s))) for s in (0, 1)]
    return rnns[0] if layer == 'RNN' else lib.Bidirectional(*rnns)

  # Both libraries' layers in one program; it carries the streams' updates out.
  call = nnx.jit(lambda ours, theirs: [layer(x, return_carry=True) for layer in (ours, theirs)])
  for layer in ('RNN', 'Bidirectional'):
    ours, theirs = build(nr, layer), build(nnx, layer)
    for _ in range(2):  # the second call: the same programs, the streams advanced
      _close(*call(ours, theirs), atol=1e-5)
    _close(nnx.state(ours, nnx.RngState), nnx.state(theirs, nnx.RngState), atol=0)


def test_bidirectional_over_flax_nnx_layers():
  """flax.nnx's ``RNN`` (``RNNBase``'s call, without ``segment_ids``) in both directions."""
  x = _x()
  rnns = [nnx.RNN(nnx.GRUCell(IN, H, rngs=nnx.Rngs(s))) for s in (0, 1)]
  # Both libraries' in one program.
  _close(*nnx.jit(lambda f, b: [lib.Bidirectional(f, b)(x, seq_lengths=LENGTHS)
                                for lib in (nr, nnx)])(*rnns), atol=1e-5)
  with pytest.raises(TypeError, match=m('Bidirectional: `segment_ids` expected None, since '
                                        'forward_rnn (flax.nnx.nn.recurrent.RNN) takes no '
                                        'segment_ids', 'got ids.')):
    nr.Bidirectional(*rnns)(x, segment_ids=jnp.ones((B, T), jnp.int32))


def test_carries_that_broadcast_over_shared_inputs_as_flax():
  """flax.nnx runs a carry its cell's broadcasts to: beams (a leading axis)
  over shared inputs, and carry rows over one shared input row (with its
  length too). ``RNN`` compared shapes exactly and refused both."""
  x, x1 = _x(), _x((1, T, IN), seed=1)
  beams = tuple(_x((2, B, H), seed=k) for k in (2, 3))
  rows = tuple(_x((B, H), seed=k) for k in (4, 5))

  def pair(lib, seed=0):
    return lib.RNN(lib.LSTMCell(IN, H, rngs=nnx.Rngs(seed)), return_carry=True)

  @nnx.jit  # one program per library
  def beam_runs(rnn, bi):
    return rnn(x, initial_carry=beams), bi(x, initial_carry=(beams, beams))

  # Built outside the context (its setting would recompile every eager op of the build).
  layers = [(pair(lib), lib.Bidirectional(pair(lib), pair(lib, 1), return_carry=True))
            for lib in (nr, nnx)]
  refused = pair(nr)
  with jax.numpy_rank_promotion('allow'):  # (B, 4H) + (beams, B, 4H), in both
    ours, theirs = (beam_runs(*layer_pair) for layer_pair in layers)
    _close(ours, theirs, atol=1e-5)
    with pytest.raises(ValueError, match=m(
        f'RNN: `initial_carry` expected leaf shapes [({B}, {H}), ({B}, {H})] with seq_lengths '
        'or segment_ids (a carry with more leading axes than the inputs, beams say, runs '
        f'without them), got [(2, {B}, {H}), (2, {B}, {H})]')):
      refused(x, initial_carry=beams, seq_lengths=LENGTHS)
  lengths = jnp.array([3])
  row_runs = nnx.jit(lambda *rnns: [rnn(x1, initial_carry=rows, seq_lengths=lengths)
                                    for rnn in rnns])  # both libraries' in one program
  (carry_o, y_o), (carry_t, y_t) = row_runs(pair(nr), pair(nnx))
  _close((carry_o, y_o[:, :3]), (carry_t, y_t[:, :3]), atol=1e-5)
  with pytest.raises(ValueError, match=m('expected leaf shapes', f'got [({B}, {H + 1})')):
    pair(nr)(x1, initial_carry=tuple(_x((B, H + 1), seed=k) for k in (4, 5)))


def test_bidirectional_random_carries_as_flax():
  """flax.nnx's Bidirectional feeds both directions' carries from one stream."""
  x = _x()

  def build(lib, **kw):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      rnns = [lib.RNN(lib.LSTMCell(IN, H, carry_init=RANDOM_CARRY, rngs=nnx.Rngs(s)))
              for s in (0, 1)]
    return lib.Bidirectional(*rnns, return_carry=True, **kw)

  # Both libraries' layers in one program; it carries the streams' updates out.
  call = nnx.jit(lambda ours, theirs, rngs_o=None, rngs_t=None: (ours(x, rngs=rngs_o),
                                                                  theirs(x, rngs=rngs_t)))
  # The stream forked from a given Rngs. (The default one, RngStream(0), feeds
  # these carries too in test_keep_rngs_cells_draw_their_carry_from_the_layers_stream_as_flax.)
  ours, theirs = (build(lib, rngs=nnx.Rngs(3)) for lib in (nr, nnx))
  for _ in range(2):  # the stored stream advances as flax's does
    (carry_o, y_o), (carry_t, y_t) = call(ours, theirs)
    _close(y_o, y_t, atol=1e-5)
    _close(carry_o, carry_t, atol=1e-5)
  ours, theirs = build(nr, rngs=False), build(nnx, rngs=False)
  call_o, call_t = nnx.Rngs(carry=5), nnx.Rngs(carry=5)
  _close(*call(ours, theirs, call_o, call_t), atol=1e-5)
  assert _count(call_o, 'carry') == _count(call_t, 'carry') == 4  # (c, h) per direction
  (fwd, bwd), _ = build(nr)(x[:, :0])  # length 0: the initial carries
  assert not np.allclose(fwd[0], bwd[0])  # one stream: the directions draw different carries


def test_bidirectional_keeps_flax_stream_when_one_direction_draws():
  """A zero-carry direction beside one whose cell draws its carry: the
  Bidirectional keeps flax.nnx's RngStream(0), the drawing direction's only
  source (its RNN keeps none), and both libraries draw the same carries."""
  def build(lib):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return lib.Bidirectional(
        lib.RNN(lib.SimpleCell(IN, H, rngs=nnx.Rngs(0))),
        lib.RNN(lib.SimpleCell(IN, H, carry_init=RANDOM_CARRY, rngs=nnx.Rngs(1)), rngs=False),
        return_carry=True)

  x = _x()
  ours, theirs = build(nr), build(nnx)
  assert ours.rngs is not None
  call = nnx.jit(lambda ours, theirs: (ours(x), theirs(x)))  # both in one program
  for _ in range(2):  # the stream advances as flax's does
    got, want = call(ours, theirs)
    _close(got, want, atol=1e-5)


@pytest.mark.parametrize('rate', ['dropout_rate', 'recurrent_dropout_rate', 'zoneout_rate'])
def test_bidirectional_with_a_dropout_direction_runs_each_rnn_as_alone(rate):
  """One direction's cell draws its carry, the other its dropout masks (or
  zoneout keys), from the call's RNG: with rngs=True the Bidirectional keeps
  no stream (one shared by both would feed them one sequence of masks), so
  each direction runs as its RNN alone does, from its own streams."""
  def build():
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      return nr.Bidirectional(
        nr.RNN(nr.GRUCell(IN, H, **{rate: 0.5}, rngs=nnx.Rngs(0))),
        nr.RNN(nr.GRUCell(IN, H, carry_init=RANDOM_CARRY, rngs=nnx.Rngs(1))))

  x = _x()
  bi, alone = build(), build()
  assert bi.rngs is None
  y, y_f, y_b = nnx.jit(lambda bi, alone: (
    bi(x), alone.forward_rnn(x), alone.backward_rnn(x, reverse=True, keep_order=True)))(bi, alone)
  _close(y, jnp.concatenate([y_f, y_b], axis=-1), atol=1e-6)


def test_bidirectional_with_dropout_cells_keeps_their_streams():
  rnns = [nr.RNN(nr.GRUCell(IN, H, dropout_rate=0.5, rngs=nnx.Rngs(s))) for s in (0, 1)]
  bi = nr.Bidirectional(*rnns)
  assert bi.rngs is None
  x = _x()
  run = nnx.jit(lambda bi: bi(x))  # one program; it carries the streams' updates out
  a, b = run(bi), run(bi)
  assert not np.allclose(a, b)  # each direction's own dropout stream advances
  call = nnx.Rngs(dropout=4)
  bi(x, rngs=call)  # a call's Rngs drives dropout from its dropout stream
  assert _count(call, 'dropout') == 2


# -- 5. composition: Bidirectional over every sequence layer ----------------------------
def test_bidirectional_over_stacks_and_refusals():
  rngs = nnx.Rngs(0)
  f1, f2 = nr.LSTMCell(IN, H, rngs=rngs), nr.GRUCell(H, H, rngs=rngs)
  b1, b2 = nr.LSTMCell(IN, H, rngs=rngs), nr.GRUCell(H, H, rngs=rngs)
  x = _x()
  bi = nr.Bidirectional(nr.StackedRNN(nr.RNN(f1), nr.RNN(f2)),
                        nr.StackedRNN(nr.RNN(b1), nr.RNN(b2)))
  flip = lambda a: nr.flip_sequences(a, LENGTHS, num_batch_dims=1, time_major=False)  # noqa: E731

  @nnx.jit  # the layer and its reference in one program
  def run(bi, f1, f2, b1, b2):
    # The backward stack: each row reversed within its length, through both layers, back.
    ref_c1, h1 = nr.RNN(b1)(flip(x), seq_lengths=LENGTHS, return_carry=True)
    ref_c2, h2 = nr.RNN(b2)(h1, seq_lengths=LENGTHS, return_carry=True)
    fwd = nr.RNN(f2)(nr.RNN(f1)(x, seq_lengths=LENGTHS), seq_lengths=LENGTHS)
    return (bi(x, seq_lengths=LENGTHS, return_carry=True),
            (jnp.concatenate([fwd, flip(h2)], axis=-1), (ref_c1, ref_c2)))

  ((carry_f, carry_b), y), (y_ref, carry_ref) = run(bi, f1, f2, b1, b2)
  _close(y, y_ref, atol=1e-5)
  _close(carry_b, carry_ref, atol=1e-5)
  for bad in (nr.Bidirectional(nr.RNN(f1), nr.RNN(b1)),
              nr.LSTM(IN, H, bidirectional=True, rngs=rngs)):
    with pytest.raises(TypeError, match=m('Bidirectional: `forward_rnn` expected a '
                                          'one-direction sequence layer',
                                          f'got {type(bad).__name__}, which already runs')):
      nr.Bidirectional(bad, nr.RNN(b1))


def test_bidirectional_accepts_and_ignores_reverse_and_keep_order_as_flax():
  rngs = nnx.Rngs(0)
  bi = nr.Bidirectional(nr.RNN(nr.GRUCell(IN, H, rngs=rngs)),
                        nr.RNN(nr.GRUCell(IN, H, rngs=rngs)))
  x = _x()
  np.testing.assert_array_equal(bi(x, reverse=True, keep_order=True), bi(x))


# -- 6. garbage in padding is inert ----------------------------------------------------
def _garbage(x, valid, value):
  return jnp.where(valid[..., None], x, value)


def _layers():
  rngs = nnx.Rngs(0)
  return {
    # A stack whose first layer, a Bidirectional, reads the garbage (its forward
    # direction: a plain RNN, tuple carry, no dropout; its backward one a
    # single-array carry), and returns its carry among the stack's; the second
    # layer reads the first's padding.
    'StackedRNN_Bidirectional': nr.StackedRNN(
      nr.Bidirectional(nr.RNN(nr.OptimizedLSTMCell(IN, H, rngs=rngs)),
                       nr.RNN(nr.MGUCell(IN, H, rngs=rngs))),
      nr.RNN(nr.SimpleCell(2 * H, H, rngs=rngs))),
    'RNN_reverse_remat_dropout': nr.RNN(
      nr.LSTMCell(IN, H, dropout_rate=0.3, recurrent_dropout_rate=0.3, rngs=rngs),
      reverse=True, keep_order=True, remat=True),
  }


@pytest.mark.parametrize('mode', ['seq_lengths', 'segment_ids'])
def test_garbage_in_padding_changes_no_output_carry_or_gradient(mode):
  x = _x()
  if mode == 'seq_lengths':
    kw = dict(seq_lengths=LENGTHS)
    valid = jnp.arange(T)[None] < LENGTHS[:, None]
  else:
    ids = jnp.array([[1, 1, 2, 2, 0], [0, 3, 3, 0, 0], [0, 0, 0, 0, 0]])
    kw = dict(segment_ids=ids)
    valid = ids != 0
  clean = _garbage(x, valid, 0.0)
  for name, layer in _layers().items():
    def loss(layer, x):
      carry, y = layer(x, return_carry=True, rngs=jax.random.key(1), **kw)
      return jnp.sum(y ** 2) + sum(jnp.sum(c) for c in jax.tree.leaves(carry)), (carry, y)

    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))  # one compile per layer
    (gp_c, gx_c), aux_c = grad(layer, clean)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(gp_c)), name
    for value in (np.nan, np.inf, -np.inf, 1e30):
      (gp_d, gx_d), aux_d = grad(layer, _garbage(x, valid, value))
      for tree in (aux_d, gp_d, gx_d):
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tree)), (name, value)
      _close(aux_d, aux_c, atol=0)
      _close(gp_d, gp_c, atol=0)
      _close(gx_d, gx_c, atol=0)
      assert not np.asarray(gx_d)[~np.asarray(valid)].any(), name  # padding: zero gradient


class _SharedLeafCell(nnx.Module):
  """A carry leaf with feature axes but no batch axes: a per-feature step
  count shared by every row (its size, H, is not the batch's)."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.lin = nnx.Linear(IN, H, rngs=rngs)

  def initialize_carry(self, input_shape, rngs=None):
    return {'h': jnp.zeros((*input_shape[:-1], H)), 'steps': jnp.zeros((H,))}

  def __call__(self, carry, x):
    h = jnp.tanh(self.lin(x) + carry['h'])
    steps = carry['steps'] + 1
    return {'h': h, 'steps': steps}, {'y': h, 'steps': steps}


def test_a_carry_leaf_without_the_batch_axes_steps_through_padding_as_flax():
  # It was masked by row (the leaf has as many axes as the lengths): a
  # broadcasting error, or, with H == B, a per-feature counter frozen by a row.
  x = _x()
  lengths = jnp.array([5, 2, 4])

  @nnx.jit
  def run(ours, theirs):  # (flax.nnx's carry gather fails on such a leaf: its outputs only)
    return ours(x, seq_lengths=lengths, return_carry=True), theirs(x, seq_lengths=lengths)

  (c_o, y_o), y_t = run(nr.RNN(_SharedLeafCell(nnx.Rngs(0))),
                        nnx.RNN(_SharedLeafCell(nnx.Rngs(0))))
  # (batch-major outputs put time after the batch's one axis: (H, T), in both)
  steps = np.broadcast_to(np.arange(1, T + 1), (H, T))
  np.testing.assert_array_equal(y_o['steps'], steps)  # not zeroed at any row's padding
  np.testing.assert_array_equal(y_t['steps'], steps)
  np.testing.assert_array_equal(c_o['steps'], np.full(H, T))  # and stepped through it
  valid = np.arange(T)[None, :, None] < np.asarray(lengths)[:, None, None]
  _close(np.where(valid, y_o['y'], 0), np.where(valid, y_t['y'], 0), atol=1e-6)
  np.testing.assert_array_equal(np.where(valid, 0, y_o['y']), 0)  # per-row leaves: zeros


class _SharedStepsCell(nnx.Module):
  """A per-row ``h`` and a carry leaf shared by the rows, ``steps``, of shape
  ``(size,)``: a per-feature step count that every row's ``h`` reads, an
  output too. Its size may be the batch's by chance."""

  num_feature_axes = 1

  def __init__(self, rngs, size):
    self.lin = nnx.Linear(IN, H, rngs=rngs)
    self.size = size

  def initialize_carry(self, input_shape, rngs=None):
    return {'h': jnp.zeros((*input_shape[:-1], H)), 'steps': jnp.zeros((self.size,))}

  def __call__(self, carry, x):
    steps = carry['steps'] + 1
    h = jnp.tanh(self.lin(x) + carry['h'] + 0.1 * steps.mean())
    return {**carry, 'h': h, 'steps': steps}, {'y': h, 'steps': steps}  # (more leaves go on)


@nnx.jit  # the loop's steps in one program per shape (op by op, each op compiled its own)
def _shared_steps_by_hand(cell, x, lengths, carry):
  """The documented masking, step by step in Python: at a row's padding its
  ``h`` keeps the last valid one and its outputs are zero; ``steps``, shared
  by the rows, goes on at every step (as in flax.nnx, which masks nothing).
  Batch-major outputs, as ``RNN`` returns them (``steps``: ``(size, T)``)."""
  ys, steps = [], []
  for t in range(x.shape[-2]):
    valid = (t < lengths)[..., None]
    new, y = cell(carry, jnp.where(valid, x[..., t, :], 0))
    carry = {'h': jnp.where(valid, new['h'], carry['h']), 'steps': new['steps']}
    ys.append(jnp.where(valid, y['y'], 0))
    steps.append(y['steps'])
  return carry, {'y': jnp.stack(ys, -2), 'steps': jnp.stack(steps, -1)}


@pytest.mark.parametrize('size', [B, B + 1])
def test_a_shared_carry_leaf_of_the_batchs_size_steps_through_padding(size):
  # Of the batch's size, the leaf was taken for one per row (its leading axis has
  # the batch's size) and each of its entries frozen at that row's padding; now the
  # cell's initialize_carry, traced at two batch sizes, says it has no batch axis.
  # (B + 1: a size the shapes told apart already.)
  x, lengths = _x(), jnp.array([5, 2, 0])
  cell = _SharedStepsCell(nnx.Rngs(0), size)
  start = cell.initialize_carry(x.shape[:1] + x.shape[2:])
  ours, theirs = nr.RNN(cell), nnx.RNN(nnx.clone(cell))

  @nnx.jit
  def run(ours, theirs, x):
    return ours(x, seq_lengths=lengths, return_carry=True), theirs(x, seq_lengths=lengths)

  (carry, y), y_t = run(ours, theirs, x)
  carry_h, y_h = _shared_steps_by_hand(cell, x, lengths, start)
  _close(carry, carry_h)
  _close(y, y_h)
  np.testing.assert_array_equal(carry['steps'], np.full(size, T))
  np.testing.assert_array_equal(y['steps'], np.broadcast_to(np.arange(1, T + 1), (size, T)))
  # flax.nnx's outputs where the rows are valid, and its shared output everywhere
  # (flax.nnx's carry gather takes entry i of the leaf at row i's last step).
  valid = (np.arange(T)[None] < np.asarray(lengths)[:, None])[..., None]
  _close(y['y'], np.where(valid, y_t['y'], 0))
  _close(y['steps'], y_t['steps'])


def test_a_shared_carry_leaf_of_the_batchs_size_where_rows_are_told_apart():
  """A carry given (the probe's structure), packed sequences, batch size 1 (whose
  one length the shapes applied to any leaf), two batch axes (the leaf of the
  first's size), a size that is the batch's under nnx.vmap and over chunks under
  nnx.scan, reversed, remat, and in a Bidirectional: the shared leaf steps at
  every step, the rows' leaves as by hand."""
  x, lengths = _x(), jnp.array([5, 2, 0])
  cell = _SharedStepsCell(nnx.Rngs(0), B)
  rnn = nr.RNN(cell)
  # An initial carry given: the shared leaf goes on from it.
  start = {'h': _x((B, H), seed=1), 'steps': jnp.full((B,), 2.0)}
  carry, y = nnx.jit(lambda rnn, x, c: rnn(x, initial_carry=c, seq_lengths=lengths,
                                           return_carry=True))(rnn, x, start)
  _close((carry, y), _shared_steps_by_hand(cell, x, lengths, start))
  np.testing.assert_array_equal(carry['steps'], np.full(B, T + 2))
  # The other layers' calls, in one program (op by op, each eager op compiled its
  # own; the lengths and segment ids closed over: constants, as given eagerly):
  # packed sequences; nnx.vmap over an ensemble axis (the batch inside is B, the
  # leaf's size); nnx.scan over two chunks of the sequence, the carry passed on;
  # reversed (outputs in processing order: the shared one has no input order,
  # test_a_shared_output_leaf_has_no_one_order_when_rows_reverse_by_length),
  # rematerialised, and both directions of a Bidirectional over a cell whose
  # outputs are the rows' alone.
  seg = jnp.array([[1, 1, 2, 2, 2], [1, 2, 0, 0, 0], [0, 0, 0, 0, 0]])
  xs = _x((2, B, T, IN))
  rows_only = _RowOutputsCell(nnx.Rngs(0), B)
  others = (nr.RNN(cell, reverse=True), nr.RNN(cell, remat=True),
            nr.Bidirectional(nr.RNN(rows_only), nr.RNN(rows_only)))

  def chunk(rnn, c, x):
    return rnn(x, initial_carry=c, seq_lengths=lengths, return_carry=True)

  @nnx.jit
  def runs(rnn, others):
    return (rnn(x, segment_ids=seg, return_carry=True),
            nnx.vmap(lambda rnn, x: rnn(x, seq_lengths=lengths, return_carry=True),
                     in_axes=(None, 0))(rnn, xs),
            nnx.scan(chunk, in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))(
              rnn, rnn.cell.initialize_carry((B, IN)), xs),
            [layer(x, seq_lengths=lengths, return_carry=True)[0] for layer in others])

  packed, vmapped, scanned, (reversed_, remat, (c_f, c_b)) = runs(rnn, others)
  # Packed sequences: never reset, never frozen.
  carry, y = packed
  np.testing.assert_array_equal(carry['steps'], np.full(B, T))
  np.testing.assert_array_equal(y['steps'], np.broadcast_to(np.arange(1, T + 1), (B, T)))
  # Batch size 1: any leaf led with the batch's one axis; two batch axes, (2, B),
  # with a shared leaf of size 2 (time-major: batch-major moves time after both
  # batch axes, which a (2,) output per step has not).
  for x2, lengths2, size in ((x[:1], lengths[1:2], 4), (_x((2, B, T, IN)), jnp.array(
      [[5, 2, 0], [1, 3, 4]]), 2)):
    cell2 = _SharedStepsCell(nnx.Rngs(0), size)
    carry, y = nnx.jit(lambda rnn, x, n=lengths2: rnn(x, seq_lengths=n, return_carry=True))(
      nr.RNN(cell2, time_major=True), jnp.moveaxis(x2, -2, 0))  # one program, n concrete
    carry_h, y_h = _shared_steps_by_hand(cell2, x2, lengths2,
                                         cell2.initialize_carry(x2.shape[:-2] + (IN,)))
    _close((carry, y['y']), (carry_h, jnp.moveaxis(y_h['y'], -2, 0)))
    np.testing.assert_array_equal(carry['steps'], np.full(size, T))
    np.testing.assert_array_equal(y['steps'], np.broadcast_to(np.arange(1, T + 1)[:, None],
                                                              (T, size)))
  # nnx.vmap: each ensemble member as by hand.
  carry, y = vmapped
  for i in range(2):
    _close(jax.tree.map(lambda a, i=i: a[i], (carry, y)),
           _shared_steps_by_hand(cell, xs[i], lengths, cell.initialize_carry((B, IN))),
           atol=1e-5)
  # nnx.scan: the two chunks as by hand, the second from the first's carry.
  carry, y = scanned
  c_h, y0 = _shared_steps_by_hand(cell, xs[0], lengths, cell.initialize_carry((B, IN)))
  c_h, y1 = _shared_steps_by_hand(cell, xs[1], lengths, c_h)
  _close((carry, y), (c_h, jax.tree.map(lambda a, b: jnp.stack([a, b]), y0, y1)), atol=1e-5)
  np.testing.assert_array_equal(carry['steps'], np.full(B, 2 * T))
  # Reversed, remat, and the Bidirectional's two directions.
  for c in (reversed_, remat, c_f, c_b):
    np.testing.assert_array_equal(c['steps'], np.full(B, T))


class _RowOutputsCell(_SharedStepsCell):
  """:class:`_SharedStepsCell` whose outputs are the rows' ``h`` alone."""

  def __call__(self, carry, x):
    carry, y = super().__call__(carry, x)
    return carry, y['y']


@pytest.mark.parametrize('size', [B, B + 1])
def test_a_shared_output_leaf_has_no_one_order_when_rows_reverse_by_length(size):
  # keep_order puts each row's outputs back in its own order; a shared leaf of
  # the batch's size had entry i put back by row i's reversal (flax.nnx's too).
  x, lengths = _x(), jnp.array([5, 2, 0])
  rnn = nr.RNN(_SharedStepsCell(nnx.Rngs(0), size), reverse=True, keep_order=True)
  with pytest.raises(ValueError, match=m(f'got an output leaf of per-step shape ({size},).')):
    rnn(x, seq_lengths=lengths)
  # A plain flip without lengths: processing step t counted t + 1, at input position T - 1 - t.
  y = rnn(x)
  np.testing.assert_array_equal(y['steps'], np.broadcast_to(np.arange(T, 0, -1), (size, T)))


class _ProbedCell(_SharedStepsCell):
  """``initialize_carry`` draws from the ``rngs`` given and from the cell's own
  stream and counts its calls in a Variable; the step counts its own."""

  def __init__(self, rngs, size):
    super().__init__(rngs, size)
    self.noise = nnx.Rngs(carry=5)
    self.inits = nnx.Variable(jnp.array(0))
    self.calls = nnx.Variable(jnp.array(0))

  def initialize_carry(self, input_shape, rngs=None):
    self.inits[...] += 1
    carry = super().initialize_carry(input_shape)
    h = jax.random.normal(rngs(), carry['h'].shape) + jax.random.normal(self.noise.carry(), ())
    return {**carry, 'h': h}

  def __call__(self, carry, x):
    self.calls[...] += 1
    return super().__call__(carry, x)


def test_finding_the_shared_carry_leaves_advances_no_stream_and_changes_no_variable():
  # The cell's initialize_carry and one step are traced on a copy, at two batch
  # sizes: after each call, the cell's and the layer's state are flax.nnx's.
  x, lengths = _x(), jnp.array([5, 2, 0])
  ours, theirs = (lib.RNN(_ProbedCell(nnx.Rngs(0), B), rngs=nnx.Rngs(carry=3))
                  for lib in (nr, nnx))
  start = {'h': jnp.ones((B, H)), 'steps': jnp.zeros((B,))}
  for run in (lambda rnn, **kw: rnn(x, seq_lengths=lengths, return_carry=True, **kw),
              nnx.jit(lambda rnn, **kw: rnn(x, seq_lengths=lengths, return_carry=True, **kw))):
    for kw in ({}, {'initial_carry': start}):
      calls, inits = int(ours.cell.calls[...]), int(ours.cell.inits[...])
      carry, _ = run(ours, **kw)
      run(theirs, **kw)
      np.testing.assert_array_equal(carry['steps'], np.full(B, T))
      _close(nnx.state(ours), nnx.state(theirs), atol=1e-5)
      assert int(ours.cell.calls[...]) == calls + T
      assert int(ours.cell.inits[...]) == inits + (0 if kw else 1)
  assert int(ours.cell.noise.carry.count[...]) == 2  # two default carries, one draw each
  assert int(ours.rngs.count[...]) == 2


class _UnprobedCell(_SharedStepsCell):
  """An ``initialize_carry`` that cannot be traced at another batch size (it
  wants its own), or none at all: the leaves' shapes decide, as before."""

  def initialize_carry(self, input_shape, rngs=None):
    if input_shape[0] != B:
      raise ValueError('a batch of 3 only')
    return super().initialize_carry(input_shape)


def test_without_a_usable_initialize_carry_the_shapes_decide():
  x, lengths = _x(), jnp.array([5, 2, 0])
  carry, _ = nr.RNN(_UnprobedCell(nnx.Rngs(0), B + 1))(x, seq_lengths=lengths, return_carry=True)
  np.testing.assert_array_equal(carry['steps'], np.full(B + 1, T))  # no batch axis by its shape
  carry, _ = nr.RNN(_UnprobedCell(nnx.Rngs(0), B))(x, seq_lengths=lengths, return_carry=True)
  np.testing.assert_array_equal(carry['steps'], lengths)  # by its shape, one entry per row
  # A carry of another structure than initialize_carry's: by the shapes too.
  cell = _SharedStepsCell(nnx.Rngs(0), B)
  given = {'h': jnp.zeros((B, H)), 'steps': jnp.zeros((B,)), 'extra': jnp.zeros((B,))}
  carry, _ = nr.RNN(cell)(x, initial_carry=given, seq_lengths=lengths, return_carry=True)
  np.testing.assert_array_equal(carry['steps'], lengths)


class _RowTupleCell(_NoInitCell):
  """A carry of one ``(H,)`` leaf per row, a tuple over the batch: its
  structure is the batch size's, so ``initialize_carry`` traced at two batch
  sizes builds two structures and says nothing of which leaves are the rows'."""

  def initialize_carry(self, input_shape, rngs=None):
    return tuple(jnp.zeros(H) for _ in range(input_shape[0]))

  def __call__(self, carry, x):
    new = tuple(super(_RowTupleCell, self).__call__(h, x[i])[0] for i, h in enumerate(carry))
    return new, jnp.stack(new)


def test_a_carry_whose_structure_is_the_batch_sizes_is_masked_by_its_shapes():
  # One row: its length applies to every leaf (by the shapes), which keeps its last
  # valid value. (The two probes' leaves, paired one by one across their structures,
  # took the row's leaf and its output for leaves shared by the rows: stepped on.)
  x, length = _x((1, T, IN)), 2
  cell = _RowTupleCell(nnx.Rngs(0))
  carry, y = nr.RNN(cell)(x, seq_lengths=jnp.array([length]), return_carry=True)

  @nnx.jit  # by hand, in one program: the valid steps, then zeros
  def by_hand(cell):
    c, ys = cell.initialize_carry((1, IN)), []
    for t in range(length):
      c, y_t = cell(c, x[:, t])
      ys.append(y_t)
    return c, jnp.stack(ys + [jnp.zeros((1, H))] * (T - length), 1)

  c, ys = by_hand(cell)
  _close(carry, c)
  _close(y, ys)


class _PositionCell(_RowOutputsCell):
  """:class:`_RowOutputsCell` with a step position ``pos`` in the carry that
  indexes a table: given as an integer, as its ``initialize_carry`` (written
  for float carries) does not build it, so the step cannot be traced from
  that carry, which still says which leaves are the rows'."""

  def initialize_carry(self, input_shape, rngs=None):
    return {**super().initialize_carry(input_shape), 'pos': jnp.zeros(())}

  def __call__(self, carry, x):
    shift = jnp.sin(jnp.arange(T, dtype=jnp.float32))[carry['pos']]
    new, y = super().__call__({'h': carry['h'] + shift, 'steps': carry['steps']}, x)
    return {**new, 'pos': carry['pos'] + 1}, y


def test_a_shared_carry_leaf_steps_through_padding_where_only_the_carry_can_be_probed():
  # The step cannot be traced from the default carry: initialize_carry alone,
  # traced at two batch sizes, says that steps (of the batch's size) is shared.
  x, lengths = _x(), jnp.array([5, 2, 0])
  cell = _PositionCell(nnx.Rngs(0), B)
  start = {'h': jnp.zeros((B, H)), 'steps': jnp.zeros((B,)), 'pos': jnp.array(0)}
  carry, y = nr.RNN(cell)(x, initial_carry=start, seq_lengths=lengths, return_carry=True)

  @nnx.jit  # by hand, in one program: h keeps its last valid value, steps and pos go on
  def by_hand(cell):
    c, ys = start, []
    for t in range(T):
      valid = (t < lengths)[:, None]
      new, y_t = cell(c, jnp.where(valid, x[:, t], 0))
      c = {**new, 'h': jnp.where(valid, new['h'], c['h'])}
      ys.append(jnp.where(valid, y_t, 0))
    return c, jnp.stack(ys, 1)

  c, ys = by_hand(cell)
  _close(carry, c)
  _close(y, ys)
  np.testing.assert_array_equal(carry['steps'], np.full(B, T))


class _ScalarStepsCell(_NoInitCell):
  """No initialize_carry (the shapes decide): a scalar step count in the carry."""

  def __call__(self, carry, x):
    h, steps = carry
    new, y = super().__call__(h, x)
    return (new, steps + 1), y


def test_a_scalar_carry_leaf_steps_through_padding_where_the_shapes_decide():
  x, lengths = _x(), jnp.array([5, 2, 0])
  cell = _ScalarStepsCell(nnx.Rngs(0))
  start = (jnp.ones((B, H)), jnp.array(0))
  carry, y = nr.RNN(cell)(x, initial_carry=start, seq_lengths=lengths, return_carry=True)
  c, ys = start, []  # by hand: h keeps its last valid value, the count goes on
  for t in range(T):
    valid = (t < lengths)[:, None]
    (h, steps), y_t = cell(c, jnp.where(valid, x[:, t], 0))
    c = (jnp.where(valid, h, c[0]), steps)
    ys.append(jnp.where(valid, y_t, 0))
  _close(carry, c)
  _close(y, jnp.stack(ys, 1))
  assert int(carry[1]) == T


class _SharedSteps2dCell(nnx.Module):
  """:class:`_SharedStepsCell` over two feature axes ``(2, IN)``, flattened
  for it; its shared ``steps`` of the batch's size."""

  num_feature_axes = 2

  def __init__(self, rngs):
    self.inner = _SharedStepsCell(rngs, B)
    self.inner.lin = nnx.Linear(2 * IN, H, rngs=rngs)

  def initialize_carry(self, input_shape, rngs=None):
    return self.inner.initialize_carry((*input_shape[:-2], 2 * IN))

  def __call__(self, carry, x):
    return self.inner(carry, x.reshape(*x.shape[:-2], 2 * IN))


def test_a_shared_carry_leaf_over_two_feature_axes_steps_through_padding():
  # The cell's carry and step are probed with both of its feature axes.
  x, lengths = _x((B, T, 2, IN)), jnp.array([5, 2, 0])
  cell = _SharedSteps2dCell(nnx.Rngs(0))
  carry, y = nr.RNN(cell)(x, seq_lengths=lengths, return_carry=True)
  carry_h, y_h = _shared_steps_by_hand(cell.inner, x.reshape(B, T, 2 * IN), lengths,
                                       cell.initialize_carry((B, 2, IN)))
  _close(carry, carry_h)
  _close(y, y_h)


class _FixedBatchCell(nnx.Module):
  """A carry built at a batch size fixed in the cell (``initialize_carry``
  ignores the batch it is given): its step runs at that size only."""

  num_feature_axes = 1

  def __init__(self, rngs, batch):
    self.lin = nnx.Linear(IN, H, rngs=rngs)
    self.batch = batch

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros((self.batch, H))

  def __call__(self, carry, x):
    h = jnp.tanh(self.lin(x) + carry)
    return h, h


def test_a_carry_of_a_batch_size_fixed_in_the_cell_is_the_rows():
  # Traced at a larger batch its carry does not grow, as a shared leaf's does
  # not: it was taken for one, so each row's carry went on through its padding.
  # The step fails at the larger batch: the carry is the batch's, as its shape says.
  x, lengths = _x(), jnp.array([5, 2, 0])
  ours, theirs = (lib.RNN(_FixedBatchCell(nnx.Rngs(0), B)) for lib in (nr, nnx))
  (c_o, y_o), (c_t, y_t) = nnx.jit(lambda a, b: (
    a(x, seq_lengths=lengths, return_carry=True),
    b(x, seq_lengths=lengths, return_carry=True)))(ours, theirs)
  valid = (np.arange(T)[None] < np.asarray(lengths)[:, None])[..., None]
  _close(y_o, np.where(valid, y_t, 0))
  _close(c_o[:2], c_t[:2])  # each row's last valid h (flax.nnx's gather)
  _close(c_o[:2], np.asarray(y_t)[[0, 1], [4, 1]])
  np.testing.assert_array_equal(c_o[2], 0)  # length 0: the initial carry


class _TokenCell(nnx.Module):
  """Token ids in, no feature axis: ``in_features`` is the vocabulary's size."""

  num_feature_axes = 0

  def __init__(self, rngs):
    self.in_features = 10
    self.embed = nnx.Embed(10, H, rngs=rngs)

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros((*input_shape, H))

  def __call__(self, carry, ids):
    h = jnp.tanh(self.embed(ids) + carry)
    return h, h


def test_a_cell_without_feature_axes_may_name_an_in_features_as_flax():
  # Its last input axis is time: the cell's in_features was checked against it.
  ids = jnp.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])
  ours, theirs = (lib.RNN(_TokenCell(nnx.Rngs(0))) for lib in (nr, nnx))
  y_o, y_t = nnx.jit(lambda a, b: (a(ids), b(ids)))(ours, theirs)
  _close(y_o, y_t)


class _PytreeCell(nnx.Pytree):
  """A cell on nnx.Pytree (nnx.Module's base), with a step counter."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.lin = nnx.Linear(IN, H, rngs=rngs)
    self.steps = nnx.Variable(jnp.array(0))

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros((*input_shape[:-1], H))

  def __call__(self, carry, x):
    self.steps[...] += 1
    h = jnp.tanh(self.lin(x) + carry)
    return h, h


def test_a_cell_on_nnx_pytree_runs_as_in_flax():
  x = _x()
  ours, theirs = (lib.RNN(_PytreeCell(nnx.Rngs(0))) for lib in (nr, nnx))
  y_o, y_t = nnx.jit(lambda a, b: (a(x), b(x)))(ours, theirs)
  _close(y_o, y_t)
  assert int(ours.cell.steps[...]) == int(theirs.cell.steps[...]) == T  # the state advanced


def test_fused_bfloat16_gru_without_bias_hn_computes_in_bfloat16_as_flax():
  # bfloat16 parameters and inputs, no b_hn: the layer computes in
  # bfloat16, as flax.nnx's GRU over the same parameters does (the zeros standing
  # in for b_hn take part in the layer's dtype promotion: of the parameters' dtype).
  x = _x().astype(jnp.bfloat16)
  fused = random_module(lambda: nr.GRU(IN, H, use_bias_hn=False, param_dtype=jnp.bfloat16,
                                       rngs=nnx.Rngs(0)))
  theirs = random_module(lambda: nnx.RNN(nnx.GRUCell(  # (no QR in bfloat16 on jax 0.12)
    IN, H, param_dtype=jnp.bfloat16, recurrent_kernel_init=nnx.initializers.zeros_init(),
    rngs=nnx.Rngs(0))))
  nnx.update(theirs.cell, nnx.state(fused.forward[0], nnx.Param))  # the same paths
  y_o, y_t = nnx.jit(lambda a, b: (a(x), b(x)))(fused, theirs)
  assert y_o.dtype == y_t.dtype == jnp.bfloat16
  _close(y_o, y_t, atol=2e-2)


@pytest.mark.parametrize('implementation', ['xla', 'pallas'])
def test_fused_gru_without_bias_hn_is_a_stack_of_flax_nnx_grus(implementation):
  # flax.nnx's GRUCell has no b_hn: nr.GRU(use_bias_hn=False) holds its parameters
  # (nothing else) and computes, values and gradients, a stack of its layers.
  x, lengths = _x(), jnp.array([5, 2, 3])
  fused = nr.GRU(IN, H, num_layers=2, bidirectional=True, use_bias_hn=False,
                 implementation=implementation, rngs=nnx.Rngs(0))
  assert fused.use_bias_hn is False
  assert not any('bias_hn' in str(path) for path, _ in nnx.to_flat_state(nnx.state(fused)))

  def flax_layer(n_in, cells):
    rnns = [nnx.RNN(nnx.GRUCell(n_in, H, rngs=nnx.Rngs(0))) for _ in cells]
    for rnn, cell in zip(rnns, cells):
      nnx.update(rnn.cell, nnx.state(cell, nnx.Param))  # the same paths and shapes
    return nnx.Bidirectional(*rnns)

  theirs = [flax_layer(IN, (fused.forward[0], fused.backward[0])),
            flax_layer(2 * H, (fused.forward[1], fused.backward[1]))]
  valid = (np.arange(T)[None] < np.asarray(lengths)[:, None])[..., None]

  def loss(model, x):
    y = model(x, seq_lengths=lengths) if isinstance(model, nr.GRU) else \
      model[1](model[0](x, seq_lengths=lengths), seq_lengths=lengths)
    return jnp.sum(jnp.where(valid, y, 0) ** 2), y

  @nnx.jit
  def run(fused, theirs):
    return [nnx.grad(loss, argnums=(0, 1), has_aux=True)(m, x) for m in (fused, nnx.List(theirs))]

  ((g_o, dx_o), y_o), ((g_t, dx_t), y_t) = run(fused, theirs)
  _close(np.where(valid, y_o, 0), np.where(valid, y_t, 0), atol=1e-5)
  _close(dx_o, dx_t, atol=1e-5)
  for layer in range(2):
    for ours, rnn in ((g_o['forward'][layer], g_t[layer]['forward_rnn']),
                      (g_o['backward'][layer], g_t[layer]['backward_rnn'])):
      _close(ours, rnn['cell'], atol=1e-5)  # the same parameter paths


@pytest.mark.parametrize('flag', ['reverse', 'keep_order', 'time_major', 'return_carry'])
def test_a_flag_computed_with_jnp_is_read_as_flax_nnx_reads_it(flag):
  """``reverse=jnp.array(True)`` runs as ``True``, as flax.nnx's ``if`` reads it;
  a traced flag is still the TypeError naming it."""
  theirs = nnx.RNN(nnx.GRUCell(IN, H, rngs=nnx.Rngs(0)))
  ours = nr.RNN(nr.GRUCell(IN, H, use_bias_hn=False, rngs=nnx.Rngs(0)))
  flags = dict(reverse=True) if flag == 'keep_order' else {}
  x = _x()
  got = ours(x, **flags, **{flag: jnp.array(True)})
  want = theirs(x, **flags, **{flag: True})
  _close(got, want)
  with pytest.raises(TypeError, match=m(f'`{flag}` expected a bool', 'traced')):
    jax.jit(lambda x, f: ours(x, **{flag: f}))(x, jnp.array(True))


def _undo_tabulates_copies(module):
  """flax's nnx.tabulate (0.12.8-0.12.12) leaves every inherited public method
  it wrapped in the traced classes' own __dict__, ``sow`` among them, which
  nnx.capture(method_outputs=...) then wraps too, recursing without end, for
  flax's own nnx.Linear as well (UPSTREAM.md). Tests earlier in this process
  ran tabulate: take such copies back out (a class's own methods stay, and
  the cells' __call__ and initialize_carry, which are ours to hold)."""
  for cls in {type(m) for _, m in nnx.iter_modules(module)}:
    for name, value in list(vars(cls).items()):
      inherited = next((vars(b)[name] for b in cls.__mro__[1:] if name in vars(b)), None)
      if value is inherited and name not in ('__call__', 'initialize_carry'):
        delattr(cls, name)


@pytest.mark.parametrize('name', ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell'])
def test_nnx_capture_records_the_cells_method_outputs_as_flax(name):
  # nnx.capture(method_outputs=...) records the methods a class defines itself,
  # not those it inherits: a cell's __call__ and initialize_carry, as flax's.
  def run(cell, x):
    return cell(cell.initialize_carry(x.shape, nnx.Rngs(0)), x)

  captured = {}
  for lib in (nr, nnx):
    cell = getattr(lib, name)(IN, H, rngs=nnx.Rngs(0))
    _undo_tabulates_copies(cell)
    if lib is nr and name == 'GRUCell':
      cell.bias_hn[...] = jnp.zeros_like(cell.bias_hn[...])  # flax.nnx's GRU has none
    _, sown = nnx.capture(run, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        cell, _x()[:, 0])
    captured[lib] = nnx.to_flat_state(sown)
  assert [p for p, _ in captured[nr]] == [p for p, _ in captured[nnx]]
  assert {p[0] for p, _ in captured[nr]} >= {'__call__', 'initialize_carry'}
  _close([v.get_value() for _, v in captured[nr]], [v.get_value() for _, v in captured[nnx]])


# flax deprecates sow outside nnx.capture; it still stores the value.
@pytest.mark.filterwarnings('ignore:Using .Module.sow\\(\\). outside:DeprecationWarning')
def test_values_sown_at_each_step_stack_over_time_as_in_flax():
  # state_axes giving nnx.Intermediate an axis: the scan stacks each step's sown value,
  # (time, batch, features), in flax.nnx's RNN and ours, plain and under nnx.capture.
  # Valid steps hold flax.nnx's values; padded ones the step on zeros from the kept
  # carry (flax.nnx's: the step on the padded inputs, NaN here), from a loop of the cell.
  x, lengths = np.asarray(_x()), np.array([5, 2, 0])
  x_nan = np.where(np.arange(T)[None, :, None] < lengths[:, None, None], x, np.nan)
  axes = nnx.StateAxes({nnx.Intermediate: 0, ...: nnx.Carry})
  cell = SowingCell(IN, H, rngs=nnx.Rngs(0))
  runs = {}
  for name, layer in (('flax', nnx.RNN), ('ours', nr.RNN)):
    rnn = layer(nnx.clone(cell), state_axes=axes)
    rnn(jnp.asarray(x_nan), seq_lengths=jnp.asarray(lengths))
    (plain,) = nnx.state(rnn, nnx.Intermediate)['cell']['h'].get_value()
    _, sown = nnx.capture(layer(nnx.clone(cell), state_axes=axes), nnx.Intermediate)(
        jnp.asarray(x_nan), seq_lengths=jnp.asarray(lengths))
    (captured,) = sown['cell']['h'].get_value()
    assert plain.shape == captured.shape == (T, B, H)
    runs[name] = np.asarray(plain), np.asarray(captured)
  carry, loop = cell.initialize_carry((B, IN), nnx.Rngs(0)), []
  for t in range(T):  # the cell alone, on zeros at padding, the carry kept there
    valid = jnp.asarray(t < lengths)[:, None]
    new, h = cell(carry, jnp.where(valid, jnp.asarray(x[:, t]), 0.0))
    carry = jax.tree.map(lambda n, o, v=valid: jnp.where(v, n, o), new, carry)
    loop.append(np.asarray(h))
  loop = np.stack(loop)
  valid = np.arange(T)[:, None] < lengths[None, :]
  for flax_sown in runs['flax']:
    np.testing.assert_allclose(flax_sown[valid], loop[valid], atol=1e-6, rtol=0)
    assert np.isnan(flax_sown[~valid]).all()
  for ours in runs['ours']:
    np.testing.assert_allclose(ours, loop, atol=1e-6, rtol=0)


def test_typed_cells_as_flax_nnx_users_write_them_run_as_flax_nnx():
  """tests/typed_cells.py: the annotated cells that `make test`'s mypy checks (a
  flax.nnx-style override of __call__ and initialize_carry failed the override
  check against our base) also run: through nr.RNN as through flax.nnx's RNN at
  the valid steps, and this package's options (a key for the carry, dropout
  masks) give flax.nnx's LSTM step on the masked input and carry."""
  from tests import typed_cells

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 3)).astype(np.float32))
  lengths = jnp.array([5, 3])
  got = typed_cells.run(x, lengths)
  flax_style, step_cell = got['cells']
  valid = (np.arange(5)[None, :] < np.asarray(lengths)[:, None])[..., None]
  want = nnx.RNN(flax_style)(x, seq_lengths=lengths)
  np.testing.assert_allclose(np.where(valid, got['flax_style'], 0.0), np.where(valid, want, 0.0),
                             atol=1e-6, rtol=0)
  nnx.update(flax_style.dense, nnx.state(step_cell.dense))
  want = nnx.RNN(flax_style)(x, seq_lengths=lengths)
  np.testing.assert_allclose(np.where(valid, got['step'], 0.0), np.where(valid, want, 0.0),
                             atol=1e-6, rtol=0)
  # The LSTM step: the carry of ones (keyed), inputs and h under the masks, in flax.nnx.
  lstm = nr.LSTMCell(3, 4, rngs=nnx.Rngs(0), dropout_rate=0.5)
  masks = lstm.dropout_masks((2, 3), rngs=jax.random.key(2))
  flax_lstm = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  nnx.update(flax_lstm, nnx.state(lstm, nnx.Param))
  assert masks.recurrent is None and masks.input is not None
  _, want = flax_lstm((jnp.ones((2, 4)), jnp.ones((2, 4))), x[:, 0] * masks.input)
  np.testing.assert_allclose(got['lstm_step'], want, atol=1e-6, rtol=0)


def test_typed_user_calls_run_with_the_carry_types_they_state():
  """tests/typed_user_calls.py, which `make test`'s mypy checks: the cells' carries are
  what the annotations there state (flax.nnx's: a pair of arrays for the LSTM cells,
  an array for the others; they were Any to type checkers)."""
  from tests import typed_user_calls

  x = jnp.ones((2, 3))
  (c, h), y = typed_user_calls.cell_carries(x)
  assert all(isinstance(a, jax.Array) for a in (c, h, y))
  for cell in (nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)), nr.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0)),
               nr.LayerNormLSTMCell(3, 4, rngs=nnx.Rngs(0))):
    carry = cell.initialize_carry(x.shape)
    (c, h), y = new = cell(carry, x)
    assert type(carry) is tuple and type(new) is tuple and type(new[0]) is tuple
    assert all(isinstance(a, jax.Array) for a in (*carry, c, h, y))
  for one in (nr.GRUCell(3, 4, rngs=nnx.Rngs(0)), nr.SimpleCell(3, 4, rngs=nnx.Rngs(0)),
              nr.MGUCell(3, 4, rngs=nnx.Rngs(0)), nr.LayerNormGRUCell(3, 4, rngs=nnx.Rngs(0))):
    h0 = one.initialize_carry(x.shape)
    new = one(h0, x)
    assert type(new) is tuple and all(isinstance(a, jax.Array) for a in (h0, *new))
  # NumPy inputs, lengths and ids (pack_sequences'): each layer's values as on jax arrays.
  rng = np.random.default_rng(0)
  seqs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (5, 2, 3)]
  layers = typed_user_calls.sequence_layers()
  got = typed_user_calls.numpy_sequences(seqs, layers)
  xs, ids = (jnp.asarray(a) for a in nr.pack_sequences(seqs, max_length=6))
  padded, lengths = jnp.ones((2, 6, 3)), jnp.asarray([5, 2])
  rnn = layers[0]
  want = [*nr.unpack_sequences(rnn(xs, segment_ids=ids), ids),
          *(layer(xs, segment_ids=ids) for layer in layers[1:]),
          *(layer(padded, seq_lengths=lengths) for layer in layers)]
  assert len(got) == len(want) == 10
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  # compat's LSTM cells: a (c, h) tuple, as the annotation (flax.linen's) states.
  (c, h), y = typed_user_calls.linen_carries(jax.random.key(0), x)
  assert all(isinstance(a, jax.Array) for a in (c, h, y))
