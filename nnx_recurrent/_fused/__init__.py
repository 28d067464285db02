"""Fused multi-layer ``LSTM`` and ``GRU`` layers with a hand-written backward pass.

The generic :class:`~nnx_recurrent.RNN` scans any cell and lets JAX
differentiate the scan. For the two cells that matter most this package does
the work a cuDNN/oneDNN kernel does, in plain JAX, with its backends side by
side, one per module, each choosing nothing:

* ``_plans``: how the XLA scans run a direction, chosen per shape from
  measurements (hoisted input projection, joint matmul, unrolling), and the
  machine probes;
* ``_step_math``: the per-step math of each cell, forward and backward (gate
  activations, the cell update, the weight gradients), shared by the backends;
* ``_xla``: the scans and the ``jax.custom_vjp`` recurrence (the default);
* ``_cudnn``: cuDNN through ``jax.experimental.rnn`` (LSTM, CUDA, opt-in);
* ``_pallas``: one Pallas kernel per direction and pass (Triton on a GPU,
  interpreted on the CPU; ``'auto'`` runs it only where it measured faster on
  a GPU, ``_plans.PALLAS_FASTER``), the kernels
  themselves in ``_pallas_kernels``, their sizes and Triton parameters in
  ``_pallas_settings``, their float16 operands' scaling in ``_float16``;
* ``_core``: what the layers do (construction, the call, packed sequences,
  the projection's sizes) and the one place that picks a backend
  (``implementation``);
* ``_layers``: :class:`LSTM` and :class:`GRU`: their cells, math and docs;
* ``internal``: the one entry point for ``benchmarks/`` and the tests (not
  public API).

The parameters live in ordinary cells (:class:`OptimizedLSTMCell`,
:class:`GRUCell`), so the layout is that of the cells and the fused layer is
numerically the composition of ``RNN`` / ``Bidirectional`` over them (the
tests check values and gradients against it, and against NumPy), with padding
(``seq_lengths``) or packed sequences (``segment_ids``), and the LSTM cells'
projection (``proj_features``) on the XLA and Pallas backends. The gate
nonlinearities are the cells' defaults (sigmoid, tanh), whose derivatives the
backward pass hard-codes.
"""

from nnx_recurrent._fused._layers import GRU as GRU
from nnx_recurrent._fused._layers import LSTM as LSTM

__all__ = ['LSTM', 'GRU']
