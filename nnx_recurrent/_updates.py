"""The GRU state update, shared by ``GRUCell``, ``LayerNormGRUCell``, ``ConvGRUCell``,
the fused ``GRU``'s step math (XLA scans and Pallas kernels) and compat's ``GRUCell``;
the MGU's, shared by ``MGUCell`` and compat's ``MGUCell``.

(The LSTM's is :func:`nnx_recurrent._base.lstm_update`.)
"""

from __future__ import annotations

from nnx_recurrent._base import Array


def gru_gates(h: Array, xr: Array, xz: Array, xn: Array, hr: Array, hz: Array, hn: Array,
              gate_fn, activation_fn) -> tuple[Array, Array, Array, Array]:
  """``(h', r, z, n)``: ``h' = (1 - z) * n + z * h`` with ``r = gate(xr + hr)``,
  ``z = gate(xz + hz)`` and ``n = act(xn + r * hn)``; ``hn`` already holds ``b_hn``
  (inside the reset product)."""
  r = gate_fn(xr + hr)
  z = gate_fn(xz + hz)
  n = activation_fn(xn + r * hn)
  return (1.0 - z) * n + z * h, r, z, n


def gru_update(h: Array, xr: Array, xz: Array, xn: Array, hr: Array, hz: Array, hn: Array,
               gate_fn, activation_fn) -> Array:
  """``h'`` of :func:`gru_gates`."""
  return gru_gates(h, xr, xz, xn, hr, hz, hn, gate_fn, activation_fn)[0]


def mgu_update(h: Array, xf: Array, xn: Array, hf: Array, hn: Array, reset_gate: bool,
               gate_fn, activation_fn) -> Array:
  """``h' = (1 - f) * n + f * h`` with ``f = gate(xf + hf)`` and ``n = act(xn + f * hn)``
  (``act(xn + hn)`` without the reset gate); ``hn`` holds ``b_hn`` where there is one.
  ``hn * f`` as flax.linen writes it: the same values as ``f * hn``, but their
  derivatives' derivatives sum their terms in the operands' order."""
  f = gate_fn(xf + hf)
  n = activation_fn(xn + (hn * f if reset_gate else hn))
  return (1.0 - f) * n + f * h
