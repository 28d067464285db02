"""flax.linen's recurrent API, computed by nnx_recurrent.

Swap one import::

    import flax.linen as nn                   # before
    from nnx_recurrent import compat as nn    # after

``RNNCellBase, LSTMCell, OptimizedLSTMCell, GRUCell, MGUCell, SimpleCell,
ConvLSTMCell, RNN, Bidirectional`` and ``flip_sequences`` are this package's:
genuine ``flax.linen.Module`` classes with flax.linen's fields, defaults, call
signatures and parameters (same names, shapes, dtypes and initial values for
the same key), whose math runs on the nnx_recurrent cells and scan core. Every
other attribute (``nn.Module``, ``nn.compact``, ``nn.Dense``,
``nn.transforms.scan``, ...) is looked up in ``flax.linen``, so code written
against ``flax.linen`` runs unchanged. ``DenseParams`` and ``RNNBase`` are
``flax.linen.recurrent``'s own, so every public name of that module imports
from here too.

:func:`to_nnx` and :func:`from_nnx` move modules and their parameters between
Linen and NNX; the parameter conversions are tabulated in
:mod:`nnx_recurrent.compat._convert`.
"""

from typing import TYPE_CHECKING

from flax.linen.recurrent import DenseParams as DenseParams
from flax.linen.recurrent import RNNBase as RNNBase

from nnx_recurrent.compat._cells import ConvLSTMCell as ConvLSTMCell
from nnx_recurrent.compat._cells import GRUCell as GRUCell
from nnx_recurrent.compat._cells import LSTMCell as LSTMCell
from nnx_recurrent.compat._cells import MGUCell as MGUCell
from nnx_recurrent.compat._cells import OptimizedLSTMCell as OptimizedLSTMCell
from nnx_recurrent.compat._cells import RNNCellBase as RNNCellBase
from nnx_recurrent.compat._cells import SimpleCell as SimpleCell
from nnx_recurrent.compat._migrate import from_nnx as from_nnx
from nnx_recurrent.compat._migrate import to_nnx as to_nnx
from nnx_recurrent.compat._rnn import RNN as RNN
from nnx_recurrent.compat._rnn import Bidirectional as Bidirectional
from nnx_recurrent.compat._rnn import flip_sequences as flip_sequences

if TYPE_CHECKING:
  # Type checkers see every other name as flax.linen's (the module's __getattr__ below
  # returns it at run time), so `nn.Module`, `nn.compact`, `nn.Dense` are typed as with
  # flax.linen, not `Any`; the names imported above keep this package's types.
  from flax.linen import *  # type: ignore[assignment]  # noqa: F403

__all__ = [
  'RNNCellBase',
  'LSTMCell',
  'OptimizedLSTMCell',
  'GRUCell',
  'MGUCell',
  'SimpleCell',
  'ConvLSTMCell',
  'RNN',
  'Bidirectional',
  'flip_sequences',
  'to_nnx',
  'from_nnx',
]


def __getattr__(name: str):
  # Everything that is not recurrent is flax.linen's own (nn.Module, nn.compact, ...).
  if name.startswith('__'):
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  import flax.linen

  try:
    return getattr(flax.linen, name)
  except AttributeError:
    raise AttributeError(
      f'module {__name__!r} has no attribute {name!r} (nor has flax.linen)'
    ) from None


def __dir__() -> list[str]:
  # dir() and completion (IPython, Jupyter) list flax.linen's names too: they resolve here.
  import flax.linen

  return sorted(set(globals()) | {n for n in dir(flax.linen) if not n.startswith('__')})
