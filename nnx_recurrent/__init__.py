"""nnx_recurrent: recurrent layers for Flax NNX.

Cells hold their parameters and sizes; :class:`RNN` scans any cell over a
sequence with masked carry selection; :class:`Bidirectional` runs two RNNs.
``nnx_recurrent.compat`` offers the same machinery as flax.linen modules, and
``nnx_recurrent.interop`` converts PyTorch modules (imports torch on use).
"""

from typing import TYPE_CHECKING

from nnx_recurrent._base import DropoutMasks as DropoutMasks
from nnx_recurrent._base import RNNCellBase as RNNCellBase
from nnx_recurrent._base import modified_orthogonal as modified_orthogonal
from nnx_recurrent._conv_gru import ConvGRUCell as ConvGRUCell
from nnx_recurrent._conv_lstm import ConvLSTMCell as ConvLSTMCell
from nnx_recurrent._fused import GRU as GRU
from nnx_recurrent._fused import LSTM as LSTM
from nnx_recurrent._gru import GRUCell as GRUCell
from nnx_recurrent._layernorm import LayerNormGRUCell as LayerNormGRUCell
from nnx_recurrent._layernorm import LayerNormLSTMCell as LayerNormLSTMCell
from nnx_recurrent._lstm import LSTMCell as LSTMCell
from nnx_recurrent._lstm import OptimizedLSTMCell as OptimizedLSTMCell
from nnx_recurrent._mgu import MGUCell as MGUCell
from nnx_recurrent._packing import pack_sequences as pack_sequences
from nnx_recurrent._packing import unpack_sequences as unpack_sequences
from nnx_recurrent._rnn import RNN as RNN
from nnx_recurrent._rnn import Bidirectional as Bidirectional
from nnx_recurrent._rnn import RNNBase as RNNBase
from nnx_recurrent._rnn import flip_sequences as flip_sequences
from nnx_recurrent._simple import SimpleCell as SimpleCell
from nnx_recurrent._stack import StackedRNN as StackedRNN

if TYPE_CHECKING:
  # Loaded on first use at run time (__getattr__ below); type checkers see the modules
  # (through __getattr__ alone, `nr.compat` and `nr.interop` were Any to a user's checker).
  from nnx_recurrent import compat as compat
  from nnx_recurrent import interop as interop

__version__ = '0.1.0'

__all__ = [
  'RNNCellBase',
  'SimpleCell',
  'LSTMCell',
  'OptimizedLSTMCell',
  'GRUCell',
  'MGUCell',
  'ConvLSTMCell',
  'ConvGRUCell',
  'LayerNormLSTMCell',
  'LayerNormGRUCell',
  'DropoutMasks',
  'RNN',
  'RNNBase',
  'Bidirectional',
  'LSTM',
  'GRU',
  'flip_sequences',
  'modified_orthogonal',
  'StackedRNN',
  'pack_sequences',
  'unpack_sequences',
]


def __getattr__(name):
  # Submodules with optional dependencies load on first use.
  if name in ('interop', 'compat'):
    import importlib

    return importlib.import_module(f'nnx_recurrent.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
