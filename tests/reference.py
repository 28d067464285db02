"""Plain NumPy references of every cell's formula and of the masked RNN.

Everything here is float64 NumPy and independent of the code under test: the
only contact with ``nnx_recurrent`` is :func:`cell_params`, which reads a cell's
parameters into per-gate matrices named after the math (``W_ii``, ``b_hn``...)
using the documented layout of each cell. The same dictionary also builds the
flax.linen variables (``linen_variables``), so the layout is cross-checked
against flax.linen as well.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr


# -- reading parameters ---------------------------------------------------------
def _np(v) -> np.ndarray:
  return np.asarray(v[...], dtype=np.float64)


def _split(v, n: int) -> list[np.ndarray]:
  return np.split(_np(v), n, axis=-1)


def cell_params(cell) -> dict:
  """Per-gate NumPy parameters of ``cell``, named after its formula."""
  if isinstance(cell, nr.SimpleCell):
    return dict(kind='simple', residual=cell.residual, W_i=_np(cell.dense_i.kernel),
                b_i=_np(cell.dense_i.bias), W_h=_np(cell.dense_h.kernel))
  if isinstance(cell, nr.LSTMCell):
    p = dict(kind='lstm')
    for g, name in zip('ifgo', ('ii', 'if_', 'ig', 'io')):
      p[f'W_i{g}'] = _np(getattr(cell, name).kernel)
    for g in 'ifgo':
      lin = getattr(cell, f'h{g}')
      p[f'W_h{g}'], p[f'b_{g}'] = _np(lin.kernel), _np(lin.bias)
    p['W_hr'] = None if cell.proj is None else _np(cell.proj.kernel)
    return p
  if isinstance(cell, nr.OptimizedLSTMCell):
    p = dict(kind='lstm')
    wi, wh, b = (_split(cell.dense_i.kernel, 4), _split(cell.dense_h.kernel, 4),
                 _split(cell.dense_h.bias, 4))
    for k, g in enumerate('ifgo'):
      p[f'W_i{g}'], p[f'W_h{g}'], p[f'b_{g}'] = wi[k], wh[k], b[k]
    p['W_hr'] = None if cell.proj is None else _np(cell.proj.kernel)
    return p
  if isinstance(cell, nr.GRUCell):
    wi, bi, wh = (_split(cell.dense_i.kernel, 3), _split(cell.dense_i.bias, 3),
                  _split(cell.dense_h.kernel, 3))
    p = dict(kind='gru', b_hn=_np(cell.bias_hn))
    for k, g in enumerate('rzn'):
      p[f'W_i{g}'], p[f'b_i{g}'], p[f'W_h{g}'] = wi[k], bi[k], wh[k]
    return p
  if isinstance(cell, nr.MGUCell):
    wi, bi, wh = (_split(cell.dense_i.kernel, 2), _split(cell.dense_i.bias, 2),
                  _split(cell.dense_h.kernel, 2))
    p = dict(kind='mgu', reset_gate=cell.reset_gate,
             b_hn=_np(cell.bias_hn) if cell.reset_gate else None)
    for k, g in enumerate('fn'):
      p[f'W_i{g}'], p[f'b_i{g}'], p[f'W_h{g}'] = wi[k], bi[k], wh[k]
    return p
  if isinstance(cell, nr.ConvLSTMCell):
    zeros = np.zeros(4 * cell.hidden_features)
    return dict(
      kind='convlstm', strides=cell.strides,
      W_x=_np(cell.ih.kernel), b_x=_np(cell.ih.bias) if cell.use_bias else zeros,
      W_h=_np(cell.hh.kernel), b_h=_np(cell.hh.bias) if cell.use_bias else zeros,
    )
  if isinstance(cell, (nr.LayerNormLSTMCell, nr.LayerNormGRUCell)):
    return _layer_norm_cell_params(cell)
  if isinstance(cell, nr.ConvGRUCell):
    zeros = np.zeros(3 * cell.hidden_features)
    return dict(
      kind='convgru', strides=cell.strides,
      W_x=_np(cell.ih.kernel), b_x=_np(cell.ih.bias) if cell.use_bias else zeros,
      W_h=_np(cell.hh.kernel), b_h=_np(cell.hh.bias) if cell.use_bias else zeros,
    )
  raise TypeError(type(cell).__name__)


def _layer_norm_cell_params(cell) -> dict:
  """LayerNormLSTMCell / LayerNormGRUCell: whole (stacked) kernels, norm scales ``g_*``
  and biases; absent scales are ones and absent biases zeros (``use_scale`` / ``use_bias``)."""
  h = cell.hidden_features
  width = cell.num_parts * h
  scale = lambda ln, n: _np(ln.scale) if cell.use_scale else np.ones(n)  # noqa: E731
  bias = lambda v, n: _np(v) if cell.use_bias else np.zeros(n)  # noqa: E731
  p = dict(eps=cell.epsilon, W_i=_np(cell.dense_i.kernel), W_h=_np(cell.dense_h.kernel),
           g_i=scale(cell.ln_i, width), g_h=scale(cell.ln_h, width),
           b=bias(cell.bias, width))
  if isinstance(cell, nr.LayerNormLSTMCell):
    return dict(p, kind='lnlstm', g_c=scale(cell.ln_c, h),
                b_c=_np(cell.ln_c.bias) if cell.use_bias else np.zeros(h))
  return dict(p, kind='lngru', b_hn=bias(cell.bias_hn, h))


def normal(shape, seed: int = 0, scale: float = 1.0, dtype=np.float32) -> jax.Array:
  """Random normal values from NumPy (no jax.random: nothing to compile)."""
  values = scale * np.random.default_rng(seed).standard_normal(tuple(shape))
  return jnp.asarray(values.astype(dtype))


def randomize(cell, seed: int = 0, scale: float = 0.5):
  """Sets every parameter of ``cell`` to random normal values (biases included)."""
  state = nnx.state(cell, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  new = [normal(leaf.shape, seed + k, scale, leaf.dtype) for k, leaf in enumerate(leaves)]
  nnx.update(cell, jax.tree_util.tree_unflatten(treedef, new))
  return cell


# -- the formulas ---------------------------------------------------------------
def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def layer_norm(v: np.ndarray, gamma: np.ndarray, beta, eps: float) -> np.ndarray:
  """``gamma * (v - mean) / sqrt(var + eps) + beta`` over the last axis (biased variance)."""
  mean = v.mean(axis=-1, keepdims=True)
  var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
  return gamma * (v - mean) / np.sqrt(var + eps) + beta


def conv_same(x: np.ndarray, w: np.ndarray, strides) -> np.ndarray:
  """N-d convolution with 'SAME' padding: ``x (*batch, *spatial, cin)``, ``w (*k, cin, cout)``.

  A loop over kernel offsets; the padding follows XLA's 'SAME': output size
  ``ceil(n / s)``, total padding ``max((out - 1) * s + k - n, 0)``, the smaller
  half before.
  """
  n = w.ndim - 2
  spatial = x.shape[-n - 1:-1]
  ks = w.shape[:n]
  outs, pads = [], []
  for size, k, s in zip(spatial, ks, strides):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    outs.append(out)
    pads.append((total // 2, total - total // 2))
  lead = x.ndim - n - 1
  xp = np.pad(x, [(0, 0)] * lead + pads + [(0, 0)])
  y = np.zeros(x.shape[:lead] + tuple(outs) + (w.shape[-1],))
  for off in itertools.product(*(range(k) for k in ks)):
    sl = tuple(slice(o, o + (m - 1) * s + 1, s) for o, m, s in zip(off, outs, strides))
    y += xp[(Ellipsis,) + sl + (slice(None),)] @ w[off]
  return y


def step(p: dict, carry, x: np.ndarray):
  """One step of the cell described by ``p``: returns ``(new_carry, y)``."""
  x = np.asarray(x, np.float64)
  kind = p['kind']
  if kind == 'simple':
    h = carry
    pre = x @ p['W_i'] + p['b_i'] + h @ p['W_h']
    if p['residual']:
      pre = pre + h
    h = np.tanh(pre)
    return h, h
  if kind == 'lstm':
    c, h = carry
    i = sigmoid(x @ p['W_ii'] + h @ p['W_hi'] + p['b_i'])
    f = sigmoid(x @ p['W_if'] + h @ p['W_hf'] + p['b_f'])
    g = np.tanh(x @ p['W_ig'] + h @ p['W_hg'] + p['b_g'])
    o = sigmoid(x @ p['W_io'] + h @ p['W_ho'] + p['b_o'])
    c = f * c + i * g
    h = o * np.tanh(c)
    if p.get('W_hr') is not None:  # LSTMP: the projected hidden state
      h = h @ p['W_hr']
    return (c, h), h
  if kind == 'gru':
    h = carry
    r = sigmoid(x @ p['W_ir'] + p['b_ir'] + h @ p['W_hr'])
    z = sigmoid(x @ p['W_iz'] + p['b_iz'] + h @ p['W_hz'])
    n = np.tanh(x @ p['W_in'] + p['b_in'] + r * (h @ p['W_hn'] + p['b_hn']))
    h = (1.0 - z) * n + z * h
    return h, h
  if kind == 'mgu':
    h = carry
    f = sigmoid(x @ p['W_if'] + p['b_if'] + h @ p['W_hf'])
    if p['reset_gate']:
      n = np.tanh(x @ p['W_in'] + p['b_in'] + f * (h @ p['W_hn'] + p['b_hn']))
    else:
      n = np.tanh(x @ p['W_in'] + p['b_in'] + h @ p['W_hn'])
    h = (1.0 - f) * n + f * h
    return h, h
  if kind == 'convlstm':
    c, h = carry
    n = p['W_x'].ndim - 2
    gates = (conv_same(x, p['W_x'], p['strides']) + p['b_x']
             + conv_same(h, p['W_h'], (1,) * n) + p['b_h'])
    i, g, f, o = np.split(gates, 4, axis=-1)
    c = sigmoid(f + 1.0) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    return (c, h), h
  if kind in ('lnlstm', 'lngru', 'convgru'):
    return step_with_recurrent_mask(p, carry, x, None)
  raise ValueError(kind)


def step_with_recurrent_mask(p: dict, carry, x: np.ndarray, mask):
  """One step of a LayerNormLSTMCell, LayerNormGRUCell or ConvGRUCell (``p['kind']``
  ``'lnlstm'``, ``'lngru'``, ``'convgru'``), with the recurrent dropout ``mask`` (or ``None``)
  on the ``h`` that enters the recurrent matmul or convolution only; NumPy gate and
  activation functions in ``p['gate_fn']``, ``p['activation_fn']`` (default sigmoid, tanh)."""
  x = np.asarray(x, np.float64)
  sig, act = p.get('gate_fn', sigmoid), p.get('activation_fn', np.tanh)
  kind = p['kind']
  c, h = carry if kind == 'lnlstm' else (None, carry)
  hm = h if mask is None else h * np.asarray(mask, np.float64)
  if kind == 'lnlstm':
    pre = (layer_norm(x @ p['W_i'], p['g_i'], 0.0, p['eps'])
           + layer_norm(hm @ p['W_h'], p['g_h'], 0.0, p['eps']) + p['b'])
    i, f, g, o = np.split(pre, 4, axis=-1)
    c = sig(f) * c + sig(i) * act(g)
    h = sig(o) * act(layer_norm(c, p['g_c'], p['b_c'], p['eps']))
    return (c, h), h
  if kind == 'lngru':
    xr, xz, xn = np.split(layer_norm(x @ p['W_i'], p['g_i'], 0.0, p['eps']) + p['b'], 3, axis=-1)
    hr, hz, hn = np.split(layer_norm(hm @ p['W_h'], p['g_h'], 0.0, p['eps']), 3, axis=-1)
    b_hn = p['b_hn']
  elif kind == 'convgru':
    n_sp = p['W_x'].ndim - 2
    xr, xz, xn = np.split(conv_same(x, p['W_x'], p['strides']) + p['b_x'], 3, axis=-1)
    hr, hz, hn = np.split(conv_same(hm, p['W_h'], (1,) * n_sp) + p['b_h'], 3, axis=-1)
    b_hn = 0.0  # the n part of b_h, already in hn
  else:
    raise ValueError(kind)
  r = sig(xr + hr)
  z = sig(xz + hz)
  n = act(xn + r * (hn + b_hn))
  h = (1.0 - z) * n + z * h
  return h, h


# -- sequences ------------------------------------------------------------------
def _tree(fn, *trees):
  if isinstance(trees[0], tuple):
    return tuple(fn(*leaves) for leaves in zip(*trees))
  return fn(*trees)


def run_sequence(p: dict, carry, xs: np.ndarray):
  """Runs the reference cell over ``xs (time, *features)`` for one row."""
  ys = []
  for x in xs:
    carry, y = step(p, carry, x)
    ys.append(y)
  return carry, ys


def rnn(p: dict, inputs, seq_lengths, carry0, *, num_batch_dims: int, time_major=False,
        reverse=False, keep_order=False):
  """The masked RNN, one row at a time on the row's unpadded part.

  Args:
    p: reference parameters (:func:`cell_params`).
    inputs: ``(*batch, time, *features)`` (or time first).
    seq_lengths: integer ``(*batch)`` or ``None`` (all full).
    carry0: initial carry (array or tuple of arrays), leaves ``(*batch, ...)``.
    num_batch_dims: number of batch axes.
    time_major, reverse, keep_order: as ``RNN``.

  Returns:
    ``(carry, outputs)``: the carry after each row's last valid step and the
    outputs, zero at padding; reverse runs the row's valid part backwards and
    outputs come in processing order unless ``keep_order``.
  """
  x = np.asarray(inputs, np.float64)
  if time_major:
    x = np.moveaxis(x, 0, num_batch_dims)
  batch = x.shape[:num_batch_dims]
  time = x.shape[num_batch_dims]
  rows = int(np.prod(batch))
  x = x.reshape((rows, time) + x.shape[num_batch_dims + 1:])
  lengths = (np.full(rows, time) if seq_lengths is None
             else np.asarray(seq_lengths).reshape(rows))
  carry0 = _tree(lambda c: np.asarray(c, np.float64).reshape((rows,) + c.shape[num_batch_dims:]),
                 carry0)
  carries, outs = [], []
  for b in range(rows):
    n = int(lengths[b])
    seq = x[b, :n][::-1] if reverse else x[b, :n]
    carry, ys = run_sequence(p, _tree(lambda c, b=b: c[b], carry0), seq)
    if reverse and keep_order:
      ys = ys[::-1]
    y_shape = step(p, _tree(lambda c, b=b: c[b], carry0), x[b, 0])[1].shape
    out = np.zeros((time,) + y_shape)
    if n:
      out[:n] = np.stack(ys)
    carries.append(carry)
    outs.append(out)
  out = np.stack(outs).reshape(batch + (time,) + outs[0].shape[1:])
  if time_major:
    out = np.moveaxis(out, num_batch_dims, 0)
  carry = _tree(lambda *cs: np.stack(cs).reshape(batch + cs[0].shape), *carries)
  return carry, out


# -- flax.linen parameter trees -------------------------------------------------
def linen_variables(p: dict) -> dict:
  """flax.linen variables for the linen cell of the same name, from :func:`cell_params`.

  Linen names: LSTMCell / OptimizedLSTMCell ``ii, if, ig, io`` (kernel) and
  ``hi, hf, hg, ho`` (kernel, bias); GRUCell ``ir, iz, in`` (kernel, bias),
  ``hr, hz`` (kernel), ``hn`` (kernel, bias); MGUCell ``if, in`` (kernel,
  bias), ``hf`` (kernel), ``hn`` (kernel, and bias with the reset gate);
  SimpleCell ``i`` (kernel, bias), ``h`` (kernel); ConvLSTMCell ``ih, hh``
  (Conv kernel, bias; gates i, g, f, o).
  """
  kind = p['kind']
  if kind == 'simple':
    v = {'i': {'kernel': p['W_i'], 'bias': p['b_i']}, 'h': {'kernel': p['W_h']}}
  elif kind == 'lstm':
    v = {}
    for g in 'ifgo':
      v[f'i{g}'] = {'kernel': p[f'W_i{g}']}
      v[f'h{g}'] = {'kernel': p[f'W_h{g}'], 'bias': p[f'b_{g}']}
  elif kind == 'gru':
    v = {}
    for g in 'rzn':
      v[f'i{g}'] = {'kernel': p[f'W_i{g}'], 'bias': p[f'b_i{g}']}
      v[f'h{g}'] = {'kernel': p[f'W_h{g}']}
    v['hn']['bias'] = p['b_hn']
  elif kind == 'mgu':
    v = {}
    for g in 'fn':
      v[f'i{g}'] = {'kernel': p[f'W_i{g}'], 'bias': p[f'b_i{g}']}
      v[f'h{g}'] = {'kernel': p[f'W_h{g}']}
    if p['reset_gate']:
      v['hn']['bias'] = p['b_hn']
  elif kind == 'convlstm':
    v = {'ih': {'kernel': p['W_x'], 'bias': p['b_x']},
         'hh': {'kernel': p['W_h'], 'bias': p['b_h']}}
  else:
    raise ValueError(kind)
  return {'params': jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), v)}


# -- the cells the tests sweep over ---------------------------------------------
# name -> (factory(rngs) -> cell, shape of one step's features)
CELLS = {
  'simple': (lambda r: nr.SimpleCell(3, 4, rngs=r), (3,)),
  'simple_residual': (lambda r: nr.SimpleCell(3, 4, residual=True, rngs=r), (3,)),
  'lstm': (lambda r: nr.LSTMCell(3, 4, rngs=r), (3,)),
  'optimized_lstm': (lambda r: nr.OptimizedLSTMCell(3, 4, rngs=r), (3,)),
  'gru': (lambda r: nr.GRUCell(3, 4, rngs=r), (3,)),
  'mgu': (lambda r: nr.MGUCell(3, 4, rngs=r), (3,)),
  'mgu_no_reset': (lambda r: nr.MGUCell(3, 4, reset_gate=False, rngs=r), (3,)),
  'conv_lstm_1d_s2': (lambda r: nr.ConvLSTMCell(2, 3, (3,), strides=2, rngs=r), (5, 2)),
  'conv_lstm_2d': (lambda r: nr.ConvLSTMCell(2, 3, (3, 3), rngs=r), (4, 5, 2)),
  'conv_lstm_2d_s2': (lambda r: nr.ConvLSTMCell(2, 3, (3, 2), strides=(2, 1), rngs=r),
                      (5, 4, 2)),
  'conv_lstm_3d': (lambda r: nr.ConvLSTMCell(2, 2, (2, 2, 2), rngs=r), (3, 3, 3, 2)),
  'layernorm_lstm': (lambda r: nr.LayerNormLSTMCell(3, 4, rngs=r), (3,)),
  'layernorm_gru': (lambda r: nr.LayerNormGRUCell(3, 4, rngs=r), (3,)),
  'conv_gru_2d_s2': (lambda r: nr.ConvGRUCell(2, 3, (3, 2), strides=(2, 1), rngs=r), (5, 4, 2)),
}


def make_cell(name: str, seed: int = 0):
  """A cell from :data:`CELLS` with random parameters, and its step feature shape."""
  factory, features = CELLS[name]
  return build(lambda: factory(nnx.Rngs(seed)), seed + 100), features


def build(make, seed: int = 0):
  """``make()``'s module with random parameters, built abstractly then filled.

  No initializer runs, so nothing compiles: the tests create many cells of
  different shapes, and each initializer compiles once per shape.
  """
  return randomize(nnx.eval_shape(make), seed)


def random_carry(cell, step_shape, seed: int = 1, scale: float = 0.5):
  """A non-zero carry for inputs of one step's shape ``step_shape``."""
  zeros = cell.initialize_carry(step_shape)
  leaves, treedef = jax.tree_util.tree_flatten(zeros)
  new = [normal(leaf.shape, seed + k, scale, leaf.dtype) for k, leaf in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)
