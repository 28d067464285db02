"""The cuDNN backend of ``nr.LSTM`` (``implementation='cudnn'``).

A layer goes through cuDNN via ``jax.experimental.rnn.lstm`` (:func:`layer`):
both directions in one call, the weights packed into cuDNN's flat layout on
the fly, so the parameters and their gradients stay the cells'. It runs on a
CUDA GPU in float32 only, and is opt-in: through JAX it measured slower than
the XLA scans on an H200 at three of the four benchmark shapes. Dropout between
layers is the layer's (``_core._FusedBase.__call__``), so every backend
computes the same function.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from nnx_recurrent import _scan
from nnx_recurrent._base import Array
from nnx_recurrent._fused._plans import cuda_backend
from nnx_recurrent._fused._step_math import LSTMMath

# Set by ``internal.fake_cuda`` (tests, ``benchmarks/cudnn_check.py --dry``):
# the CUDA check passes, and ``_substitute`` (when set) runs instead of cuDNN.
_fake_cuda = False
_substitute = None


def unsupported(dtype) -> str | None:
  """Why cuDNN cannot run this computation (``None``: it can)."""
  if not (_fake_cuda or cuda_backend()):
    return f'needs a CUDA GPU, and the default backend is {jax.default_backend()!r}'
  if jnp.dtype(dtype) != jnp.float32:
    return f'runs float32 only, and the computation dtype is {jnp.dtype(dtype).name}'
  config: Any = jax.config  # its flags are attributes set at runtime, unknown to the stubs
  precision = config.jax_default_matmul_precision
  if precision is not None and str(precision).lower() not in _PRECISIONS:
    return f'has no matmul precision {precision!r} (jax_default_matmul_precision)'
  return None


# Names of lax.Precision.HIGH and HIGHEST (TF32 on or off: the two cuDNN modes).
# Not the dot-algorithm presets ('F32_F32_F32', ...): jax.experimental.rnn reads
# those as no precision at all and runs TF32, whatever the preset says.
_PRECISIONS = ('high', 'tensorfloat32', 'highest', 'float32')


def _lstm(x, h0, c0, weights, lengths, *, input_size, hidden_size, bidirectional):
  """``jax.experimental.rnn.lstm`` for one layer: ``(y, h_n, c_n)``, batch-major.

  Tests replace this with ``jax.experimental.rnn.lstm_ref`` (the same function
  in plain JAX, through ``internal.fake_cuda``) to check everything around it
  on the CPU.
  """
  if _substitute is not None:
    return _substitute(x, h0, c0, weights, lengths, input_size=input_size,
                       hidden_size=hidden_size, bidirectional=bidirectional)
  from jax.experimental import rnn

  return rnn.lstm(x, h0, c0, weights, lengths, input_size=input_size, hidden_size=hidden_size,
                  num_layers=1, dropout=0.0, bidirectional=bidirectional)


def _weights(cells, dtype) -> Array:
  """The cells' parameters in cuDNN's flat layout (see ``jax.experimental.rnn``):
  ``W_ih, W_hh`` of each direction, then ``b_ih, b_hh`` of each. Gates ``i, f,
  g, o`` are cuDNN's order already; our one bias is ``b_ih`` and ``b_hh`` is
  zero (its gradient, equal to ``b_ih``'s, is dropped)."""
  mats, biases = [], []
  for cell in cells:
    w_i, b, w_h, _ = LSTMMath.params(cell)
    mats += [w_i.T.reshape(-1), w_h.T.reshape(-1)]  # (4H, I) and (4H, H), row-major
    biases += [b, jnp.zeros_like(b)]
  return jnp.concatenate([a.astype(dtype) for a in mats + biases])


def _row_major(*arrays: Array) -> list[Array]:
  """The arrays in row-major memory layout, and their cotangents too.

  cuDNN's custom calls (``jax.experimental.rnn``) read their operands as
  row-major but do not tell XLA so: under ``jit`` XLA may turn the transpose
  that makes ``x`` batch-major into a layout change, and cuDNN then reads
  time-major memory as batch-major (wrong results, no error: measured on an
  H200 with jax 0.11.2; jax-ml/jax#19177). A layout constraint is linear, so
  its transpose constrains the cotangents that the backward call reads.
  """
  from jax.experimental.layout import Layout, with_layout_constraint

  return [with_layout_constraint(a, Layout(tuple(range(a.ndim)))) for a in arrays]


def layer(cells, xs: Array, carries, seq_lengths: Array | None, dtype):
  """One LSTM layer, one or both directions, through cuDNN.

  ``xs`` is time-major ``(time, *batch, features)``, ``carries`` one ``(c, h)``
  per direction. Returns ``(finals, ys)`` as the scans do: ``ys`` time-major,
  the backward direction's outputs in input order after the forward's.
  """
  time, batch, features = xs.shape[0], xs.shape[1:-1], xs.shape[-1]
  n, hidden = math.prod(batch), cells[0].hidden_features
  x = jnp.swapaxes(xs.reshape(time, n, features), 0, 1).astype(dtype)
  c0 = jnp.stack([c.reshape(n, hidden) for c, _ in carries]).astype(dtype)
  h0 = jnp.stack([h.reshape(n, hidden) for _, h in carries]).astype(dtype)
  if seq_lengths is None:
    lengths = jnp.full((n,), time, jnp.int32)
  else:  # out-of-range lengths act as the scans treat them (see _checks.check_seq_lengths)
    lengths = jnp.clip(seq_lengths.reshape(n), 0, time).astype(jnp.int32)
  x, h0, c0 = _row_major(x, h0, c0)
  # cuDNN fails on zero lengths (jax-ml/jax#17966): run one step, then undo it.
  with jax.named_scope('nr.LSTM/cudnn'):
    out = _lstm(x, h0, c0, _weights(cells, dtype), jnp.maximum(lengths, 1),
                input_size=features, hidden_size=hidden, bidirectional=len(cells) == 2)
  y, h_n, c_n = _row_major(*out)  # and their cotangents, the backward call's operands
  if seq_lengths is not None:
    empty = lengths == 0
    y = jnp.where(empty[:, None, None], jnp.zeros_like(y), y)
    c_n = jnp.where(empty[None, :, None], c0, c_n)
    h_n = jnp.where(empty[None, :, None], h0, h_n)
  ys = jnp.swapaxes(y, 0, 1).reshape(time, *batch, y.shape[-1])
  finals = [(c_n[d].reshape(*batch, hidden).astype(_scan.held_dtype(c)),
             h_n[d].reshape(*batch, hidden).astype(_scan.held_dtype(h)))
            for d, (c, h) in enumerate(carries)]
  return finals, ys
