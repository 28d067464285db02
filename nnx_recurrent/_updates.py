"""The GRU state update, shared by ``GRUCell``, ``LayerNormGRUCell`` and ``ConvGRUCell``.

(The LSTM's is :func:`nnx_recurrent._base.lstm_update`.)
"""

from __future__ import annotations

from nnx_recurrent._base import Array


def gru_update(h: Array, xr: Array, xz: Array, xn: Array, hr: Array, hz: Array, hn: Array,
               gate_fn, activation_fn) -> Array:
  """``h' = (1 - z) * n + z * h`` with ``r = gate(xr + hr)``, ``z = gate(xz + hz)`` and
  ``n = act(xn + r * hn)``; ``hn`` already holds ``b_hn`` (inside the reset product)."""
  r = gate_fn(xr + hr)
  z = gate_fn(xz + hz)
  n = activation_fn(xn + r * hn)
  return (1.0 - z) * n + z * h
