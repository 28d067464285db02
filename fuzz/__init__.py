"""Differential fuzzing of nnx_recurrent against flax.nnx, flax.linen and PyTorch.

Each case draws a configuration (layer, sizes, batch axes, lengths, options)
from its own seed, runs this package and the reference library on the same
parameters and inputs, and compares what users read: outputs, carries,
gradients, and for bad arguments the error raised. A failure names its case
seed, which replays the case alone::

  python -m fuzz --family nnx --cases 200 --seed 0
  python -m fuzz --family nnx --replay 123456789
  python -m fuzz --family layers --cases 50 --force "features='conv'"

Families: ``nnx`` (nr.RNN, nr.Bidirectional and the cells against flax.nnx,
in float32 or with bfloat16 / float16 compute, parameters or inputs, dtypes
compared too; and the fused nr.LSTM / nr.GRU against flax.nnx's RNNs stacked
by hand, the Pallas kernels in interpret mode with their sizes drawn: loads a
step ahead or not, several column chunks with weights partly held, the loop
over the chunks; the XLA scans with this machine's plan or a GPU's, every scan
unrolled 8 times), ``layers`` (random trees of nested layers -- StackedRNN,
Bidirectional, fused, RNN with remat, unroll and learned carries, over this
package's cells, flax.nnx's and a user's, or convolutional cells over one or
two spatial axes; variational dropout -- with lengths or packed
``segment_ids``, against Python loops of cells over each sequence alone), ``streaming``
(those of them that stream, run in chunks with each chunk's carry passed on,
against the same loops),
``state`` (a user's stateful flax.nnx cell -- step counter, its own dropout
stream, a running mean -- in nr.RNN against flax.nnx.RNN: outputs, gradients
and every Variable of the cell after each call), ``linen``
(compat against flax.linen, dtypes drawn as for ``nnx``; its packed
``segment_ids`` against flax.linen's cell looped over each segment),
``torch`` (nr.LSTM / nr.GRU against torch.nn.LSTM / GRU, through
``nnx_recurrent.interop.torch``; the Pallas kernels in interpret mode too,
their sizes and the scans' plan drawn as for ``nnx``)
``errors`` (bad arguments get a ``ValueError`` or ``TypeError`` naming
the argument) and ``carry`` (a user's cell with carry leaves shared by the
rows -- a step counter, a vector of the batch's size or not -- and per-step
scalar outputs, dict or tuple carries, one or two batch axes, in nr.RNN and
in compat.RNN (written in Linen) against a NumPy loop of the documented
masking and layout), ``explicit`` (every sequence layer under a mesh of
Explicit axes, inputs, masks, carry and parameters each split or not, against
the same layer without a mesh: values, gradients and their types) and
``transforms`` (nr.RNN and nr.Bidirectional, over this package's cells or a
user's stateful one, nr.StackedRNN of them, and the fused nr.LSTM / nr.GRU,
under flax.nnx's transforms -- ensembles by ``nnx.split_rngs`` +
``nnx.vmap``, ``nnx.vmap`` over the inputs, layers in turn by ``nnx.scan``,
``nnx.remat``, ``nnx.cond``, ``nnx.fori_loop``, ``nnx.jit``, ``nnx.grad`` --
in graph mode, tree mode or without graph updates, against flax.nnx's RNN
under the same transforms: outputs, gradients and every Variable after each
call), ``linen_transforms`` (compat.RNN and compat.Bidirectional in a
Linen model lifted by ``nn.jit``, ``nn.vmap``, ``nn.scan`` or ``nn.remat``,
against the same model over flax.linen's names) and ``migrate``
(``compat.to_nnx`` / ``compat.from_nnx`` on genuine flax.linen cells, RNNs
and Bidirectionals, their fields, dtypes and partitioned parameters drawn,
against flax.linen's ``apply`` on the same checkpoint: outputs, carries,
gradients, and the round trip's variables exactly). The deliberate differences
from flax (docs/migrating_from_nnx.md, compat/README.md) are compared with
what the docs promise instead: zeros at padding, the initial carry for a row
of length 0, each row's own carry with several batch axes.
The campaigns run and what they found: fuzz/README.md.
"""
