"""Arguments that do not bind: Python's ``TypeError``, naming the public class
and method the user called (never a private base class), with a hint for
PyTorch's and flax.linen's names and for close matches.

The mechanism (``_checks.named_errors``) must leave everything else as it was:
signatures, docstrings, ``help()``, flax's transforms, pickling, copies, user
subclasses, and ``TypeError``s raised inside the methods.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import pydoc
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from nnx_recurrent import _checks, compat

X = jnp.ones((2, 5, 3))


def m(*parts):
  """A regex matching the literal message fragments in order, from the start."""
  return '^' + '.*'.join(re.escape(p) for p in parts)


def raises(message_parts, fn):
  with pytest.raises(TypeError, match=m(*message_parts)) as info:
    fn()
  assert not re.search(r'(?<!\w)_[A-Z]', str(info.value))  # no _LSTMBase, _FusedBase, _Cell...
  return str(info.value)


def abstract(make):
  """The module ``make`` builds, with abstract parameters (nothing computed:
  arguments that do not bind fail before anything runs)."""
  return nnx.eval_shape(make)


def _rnn():
  return nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0)))


# Every public class of nr with keywords, built with ``**kw`` added.
BUILDERS = {
  'SimpleCell': lambda **kw: nr.SimpleCell(3, 4, rngs=nnx.Rngs(0), **kw),
  'LSTMCell': lambda **kw: nr.LSTMCell(3, 4, rngs=nnx.Rngs(0), **kw),
  'OptimizedLSTMCell': lambda **kw: nr.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0), **kw),
  'GRUCell': lambda **kw: nr.GRUCell(3, 4, rngs=nnx.Rngs(0), **kw),
  'MGUCell': lambda **kw: nr.MGUCell(3, 4, rngs=nnx.Rngs(0), **kw),
  'ConvLSTMCell': lambda **kw: nr.ConvLSTMCell(3, 4, (3,), rngs=nnx.Rngs(0), **kw),
  'ConvGRUCell': lambda **kw: nr.ConvGRUCell(3, 4, (3,), rngs=nnx.Rngs(0), **kw),
  'LayerNormLSTMCell': lambda **kw: nr.LayerNormLSTMCell(3, 4, rngs=nnx.Rngs(0), **kw),
  'LayerNormGRUCell': lambda **kw: nr.LayerNormGRUCell(3, 4, rngs=nnx.Rngs(0), **kw),
  'RNN': lambda **kw: nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0)), **kw),
  'Bidirectional': lambda **kw: nr.Bidirectional(_rnn(), _rnn(), **kw),
  'StackedRNN': lambda **kw: nr.StackedRNN(_rnn(), **kw),
  'LSTM': lambda **kw: nr.LSTM(3, 4, rngs=nnx.Rngs(0), **kw),
  'GRU': lambda **kw: nr.GRU(3, 4, rngs=nnx.Rngs(0), **kw),
}
CELLS = [name for name in BUILDERS if name.endswith('Cell')]
LAYERS = [name for name in BUILDERS if not name.endswith('Cell')]

# (keyword, the hint) for each class's constructor: a typo, then a PyTorch name.
INIT_TYPO = {
  **{name: ('hiden_features', "Did you mean 'hidden_features'?") for name in CELLS},
  'RNN': ('time_majr', "Did you mean 'time_major'?"),
  'Bidirectional': ('merge_fun', "Did you mean 'merge_fn'?"),
  'StackedRNN': ('dropout_rat', "Did you mean 'dropout_rate'?"),
  'LSTM': ('num_layer', "Did you mean 'num_layers'?"),
  'GRU': ('use_bias_h', "Did you mean 'use_bias_hn'?"),
}
BATCH_FIRST = ("PyTorch's batch_first: inputs here are batch-major by default (time_major=False, "
               'as batch_first=True); batch_first=False is time_major=True.')
INIT_TORCH = {
  **{name: ('hidden_size', "PyTorch's hidden_size is hidden_features here.") for name in CELLS},
  'SimpleCell': ('nonlinearity', "PyTorch's nonlinearity is activation_fn here, a function "
                                 "(jax.nn.relu), not a string ('relu')."),
  'ConvLSTMCell': ('bias', "PyTorch's bias is use_bias here."),
  'LayerNormGRUCell': ('bias', "PyTorch's bias is use_bias here."),
  'RNN': ('batch_first', BATCH_FIRST),
  'Bidirectional': ('batch_first', BATCH_FIRST),
  'StackedRNN': ('dropout', "PyTorch's dropout is dropout_rate here."),
  'LSTM': ('batch_first', BATCH_FIRST),
  'GRU': ('input_size', "PyTorch's input_size is in_features here."),
}


@pytest.mark.parametrize('kind', ['typo', 'pytorch'])
@pytest.mark.parametrize('name', list(BUILDERS))
def test_an_unknown_constructor_keyword_names_the_class_and_hints(name, kind):
  keyword, hint = (INIT_TYPO if kind == 'typo' else INIT_TORCH)[name]
  raises([f"{name}.__init__() got an unexpected keyword argument '{keyword}'. {hint}"],
         lambda: BUILDERS[name](**{keyword: 1}))


def _call(name, **kw):
  module = abstract(BUILDERS[name])
  if name in CELLS:
    x = jnp.ones((2, 6, 3)) if name.startswith('Conv') else jnp.ones((2, 3))
    return module(module.initialize_carry(x.shape), x, **kw)
  return module(X, **kw)


CALL_TYPO = {
  **{name: ('dropout_mask', "Did you mean 'dropout_masks'?") for name in CELLS},
  **{name: ('seq_length', "Did you mean 'seq_lengths'?") for name in LAYERS},
  'Bidirectional': ('initial_cary', "Did you mean 'initial_carry'?"),
}
CALL_TORCH = {
  **{name: ('hx', "PyTorch's hx is the carry here, the first argument: new_carry, y = "
                  'cell(carry, inputs).') for name in CELLS},
  # The carry's order only where the layer carries an LSTM's (c, h): these layers run GRUs.
  **{name: ('hx', "PyTorch's hx is initial_carry here.") for name in LAYERS},
  'LSTM': ('hx', "PyTorch's hx is initial_carry here (an LSTM carry is (c, h), c first)."),
  'RNN': ('lengths', "PyTorch's lengths (of pack_padded_sequence) are seq_lengths here."),
}


@pytest.mark.parametrize('kind', ['typo', 'pytorch'])
@pytest.mark.parametrize('name', list(BUILDERS))
def test_an_unknown_call_keyword_names_the_class_and_hints(name, kind):
  keyword, hint = (CALL_TYPO if kind == 'typo' else CALL_TORCH)[name]
  message = raises([f"{name}.__call__() got an unexpected keyword argument '{keyword}'. {hint}"],
                   lambda: _call(name, **{keyword: None}))
  if name in CELLS:  # the cell's options: what it takes, a sentence after the hint
    assert message == (f"{name}.__call__() got an unexpected keyword argument '{keyword}'. "
                       f"{hint} A cell's options are the keywords dropout_masks and rngs.")


def test_the_issues_examples():
  raises(["LSTM.__init__() got an unexpected keyword argument 'batch_first'. ", BATCH_FIRST],
         lambda: nr.LSTM(3, 4, batch_first=True, rngs=nnx.Rngs(0)))
  for torch_name, ours in [('hidden_size', 'hidden_features'), ('input_size', 'in_features'),
                           ('proj_size', 'proj_features'), ('dropout', 'dropout_rate')]:
    raises([f"LSTM.__init__() got an unexpected keyword argument '{torch_name}'. PyTorch's "
            f'{torch_name} is {ours} here.'],
           lambda: nr.LSTM(3, 4, rngs=nnx.Rngs(0), **{torch_name: 2}))  # noqa: B023
  # PyTorch's bias=False has no counterpart in the fused layers: the hint says what to do.
  raises(["LSTM.__init__() got an unexpected keyword argument 'bias'. PyTorch's bias: there is "
          'no bias=False here; the biases start at zero (bias_init), and stay there when left '
          'out of the optimizer'], lambda: nr.LSTM(3, 4, bias=False, rngs=nnx.Rngs(0)))
  lstm = abstract(lambda: nr.LSTM(3, 4, rngs=nnx.Rngs(0)))
  for keyword, hint in [('hx', "PyTorch's hx is initial_carry here"),
                        ('lengths', "PyTorch's lengths (of pack_padded_sequence) are "
                                    'seq_lengths here.'),
                        ('seq_length', "Did you mean 'seq_lengths'?")]:
    raises([f"LSTM.__call__() got an unexpected keyword argument '{keyword}'. {hint}"],
           lambda: lstm(X, **{keyword: None}))  # noqa: B023
  raises(["LSTMCell.__init__() got an unexpected keyword argument 'hidden_size'. PyTorch's "
          'hidden_size is hidden_features here.'],
         lambda: nr.LSTMCell(3, 4, rngs=nnx.Rngs(0), hidden_size=3))
  # A cell has no dropout between layers: its own dropout is another thing.
  raises(["GRUCell.__init__() got an unexpected keyword argument 'dropout'. PyTorch's dropout, "
          'between layers, is dropout_rate of nr.StackedRNN, nr.LSTM and nr.GRU; a cell\'s '
          'dropout_rate and recurrent_dropout_rate are variational dropout within the cell.'],
         lambda: nr.GRUCell(3, 4, rngs=nnx.Rngs(0), dropout=0.1))
  raises(["RNN.__call__() got an unexpected keyword argument 'seq_length'. Did you mean "
          "'seq_lengths'?"], lambda: abstract(_rnn)(X, seq_length=None))


def test_flax_linen_names_given_to_nnx_modules():
  raises(["LSTMCell.__init__() got an unexpected keyword argument 'features'. flax.linen's "
          'features is hidden_features here (an NNX cell takes in_features too'],
         lambda: nr.LSTMCell(3, rngs=nnx.Rngs(0), features=4))
  raises(["RNN.__init__() got an unexpected keyword argument 'cell_size'. flax.linen's "
          'cell_size: not needed here'], lambda: BUILDERS['RNN'](cell_size=4))
  for name in ('variable_axes', 'variable_broadcast', 'variable_carry'):
    raises([f"RNN.__init__() got an unexpected keyword argument '{name}'. flax.linen's {name}: "
            'one mapping here, state_axes'], lambda: BUILDERS['RNN'](**{name: {}}))  # noqa: B023
  raises(["RNN.__init__() got an unexpected keyword argument 'split_rngs'. flax.linen's "
          'split_rngs: here, as in flax.nnx, RNG streams are split over the steps but those '
          'named in broadcast_rngs.'], lambda: BUILDERS['RNN'](split_rngs={}))
  raises(["Bidirectional.__call__() got an unexpected keyword argument 'init_key'. flax.linen's "
          'init_key is rngs here.'], lambda: _call('Bidirectional', init_key=None))
  raises(["StackedRNN.__call__() got an unexpected keyword argument 'deterministic'. Dropout is "
          'switched off by model.eval()'], lambda: _call('StackedRNN', deterministic=True))
  # flax.nnx's own parameters are all ours (tests/test_dropin.py): none of these is one.
  for name in ('RNN', 'Bidirectional', 'LSTMCell', 'SimpleCell'):
    for method in ('__init__', '__call__'):
      theirs = inspect.signature(getattr(getattr(nnx, name), method)).parameters
      assert not set(theirs) & set(_checks._OTHER_NAMES), (name, method)


def test_every_hint_names_a_parameter_that_exists():
  signatures = [inspect.signature(getattr(getattr(nr, name), method)).parameters
                for name in nr.__all__ if isinstance(getattr(nr, name), type)
                for method in ('__init__', '__call__', 'initialize_carry')
                if hasattr(getattr(nr, name), method)]
  ours = set().union(*signatures) | {'carry', 'dropout_masks', 'rngs'}  # a cell's options
  for foreign, pairs in _checks._OTHER_NAMES.items():
    assert not any(foreign in params for params in signatures), foreign  # not ours already
    for target, hint in pairs:
      assert target in ours, (foreign, target)
      # The hint says what to pass instead ('rngs' marks the NNX modules for 'deterministic').
      assert target in hint or foreign == 'deterministic', (foreign, target, hint)


def test_a_name_of_another_library_without_a_counterpart_gets_no_hint():
  # GRU has no projection: no hint naming proj_features, Python's message alone.
  with pytest.raises(TypeError) as info:
    BUILDERS['GRU'](proj_size=2)
  assert str(info.value) == "GRU.__init__() got an unexpected keyword argument 'proj_size'"


def test_other_binding_errors_name_the_public_class():
  raises(["LSTMCell.__init__() missing 1 required positional argument: 'hidden_features'"],
         lambda: nr.LSTMCell(3, rngs=nnx.Rngs(0)))
  raises(["OptimizedLSTMCell.__init__() missing 1 required keyword-only argument: 'rngs'"],
         lambda: nr.OptimizedLSTMCell(3, 4))
  raises(['ConvLSTMCell.__init__() takes 4 positional arguments but 5 positional arguments (and 1 '
          'keyword-only argument) were given. Its other arguments are keyword-only: strides, '],
         lambda: nr.ConvLSTMCell(3, 4, (3,), 1, rngs=nnx.Rngs(0)))
  lstm = abstract(lambda: nr.LSTM(3, 4, rngs=nnx.Rngs(0)))
  h = (jnp.zeros((2, 4)),) * 2
  raises(['LSTM.__call__() takes 2 positional arguments but 3 were given. Its other arguments '
          'are keyword-only: initial_carry, seq_lengths, ', "(PyTorch's layer(x, hx) is "
          'layer(x, initial_carry=hx) here).'], lambda: lstm(X, h))
  raises(["GRU.__call__() got multiple values for argument 'inputs'"],
         lambda: abstract(BUILDERS['GRU'])(X, inputs=X))
  cell = abstract(BUILDERS['GRUCell'])
  raises(["GRUCell.__call__() missing 1 required positional argument: 'inputs'. PyTorch's hx is "
          'the carry here, the first argument'], lambda: cell(X[:, 0], hx=None))
  raises(["GRUCell.initialize_carry() got an unexpected keyword argument 'carry_int'. Did you "
          "mean 'carry_init'?"], lambda: cell.initialize_carry((2, 3), carry_int=None))
  raises(["StackedRNN.__init__() got an unexpected keyword argument 'layers'. Pass the layers "
          'positionally, as *layers.'], lambda: nr.StackedRNN(layers=[_rnn()]))
  # A looser typo (difflib's ratio 0.71) still finds its argument.
  raises(["RNN.__call__() got an unexpected keyword argument 'seqlen'. Did you mean "
          "'seq_lengths'?"], lambda: abstract(BUILDERS['RNN'])(X, seqlen=None))


def test_the_keyword_only_hints_are_for_too_many_positional_arguments_alone():
  # A missing argument is Python's message as it is (the undecorated method's);
  # the PyTorch recipe layer(x, initial_carry=hx) is for a method taking initial_carry.
  with pytest.raises(TypeError) as python:
    inspect.unwrap(nr.LSTMCell.__init__)(object(), 3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError) as ours:
    nr.LSTMCell(3, rngs=nnx.Rngs(0))
  # (Python names the class that defines the method, a private base: ours the one called.)
  assert str(ours.value) == 'LSTMCell.__init__' + str(python.value).split('.__init__', 1)[1]
  assert ours.value.__cause__ is None and ours.value.__suppress_context__  # no chained copy
  message = raises(['ConvLSTMCell.__init__() takes 4 positional arguments but 5 positional '
                    'arguments (and 1 keyword-only argument) were given. Its other arguments '
                    'are keyword-only: strides, '],
                   lambda: nr.ConvLSTMCell(3, 4, (3,), 1, rngs=nnx.Rngs(0)))
  assert 'initial_carry' not in message and "PyTorch's" not in message


def test_user_subclasses_get_their_own_class_named_or_pythons_message():
  class Inherits(nr.LSTMCell):  # the constructor is LSTMCell's: the user's class is named
    pass

  raises(["Inherits.__init__() got an unexpected keyword argument 'hidden_size'. PyTorch's "
          'hidden_size is hidden_features here.'],
         lambda: Inherits(3, 4, rngs=nnx.Rngs(0), hidden_size=4))

  class _Mine(nr.LSTMCell):  # a user's class of a private name: named, as Python names it
    pass

  with pytest.raises(TypeError, match=m("_Mine.__init__() got an unexpected keyword argument "
                                        "'hidden_size'. PyTorch's hidden_size is")):
    _Mine(3, 4, rngs=nnx.Rngs(0), hidden_size=4)

  class Own(nr.LSTMCell):  # its own signature: Python's message about it, untouched
    def __init__(self, size, *, rngs, extra=0):
      super().__init__(size, size, rngs=rngs)
      self.extra = extra

  cell = Own(3, rngs=nnx.Rngs(0), extra=1)  # not broken
  assert cell.extra == 1 and cell.hidden_features == 3
  carry, y = cell(cell.initialize_carry((2, 3)), jnp.ones((2, 3)))
  assert y.shape == (2, 3)
  with pytest.raises(TypeError) as info:
    Own(3, rngs=nnx.Rngs(0), hidden_size=3)
  assert re.fullmatch(r"(test_\w+\.<locals>\.)?Own\.__init__\(\) got an unexpected keyword "
                      r"argument 'hidden_size'", str(info.value))

  class Passes(nr.RNNCellBase):  # its super() call is wrong: the base it called is named
    def __init__(self, size, *, rngs):
      super().__init__(size, size, rngs=rngs, hidden_size=size)

  raises(["RNNCellBase.__init__() got an unexpected keyword argument 'hidden_size'. PyTorch's "
          'hidden_size is hidden_features here.'], lambda: Passes(3, rngs=nnx.Rngs(0)))

  class FlaxStyle(nr.RNNCellBase):  # flax's style: its own __call__ and initialize_carry
    def __init__(self, size):
      self.size = size

    def __call__(self, carry, inputs):
      return carry + inputs, carry

    def initialize_carry(self, input_shape, rngs=None):
      return jnp.zeros(input_shape)

  flax_style = FlaxStyle(3)
  assert nr.RNN(flax_style)(X).shape == X.shape
  with pytest.raises(TypeError) as info:
    flax_style(X[:, 0], X[:, 0], seq_length=None)
  assert re.fullmatch(r"(test_\w+\.<locals>\.)?FlaxStyle\.__call__\(\) got an unexpected "
                      r"keyword argument 'seq_length'", str(info.value))


def test_a_type_error_raised_inside_a_method_is_not_rewritten():
  def helper(*, known):
    return known

  class Raises(nr.RNNCellBase):
    def __init__(self, *, rngs, fail=False):
      super().__init__(3, 4, rngs=rngs)
      if fail:
        helper(unknown=1)  # a binding error of another function, inside the body

    def step(self, carry, inputs, recurrent_mask):
      raise TypeError("step() got an unexpected keyword argument 'seq_length'")

  with pytest.raises(TypeError) as info:
    Raises(rngs=nnx.Rngs(0), fail=True)
  # Python 3.13 adds its own hint, "Did you mean 'known'?": Python's message, untouched.
  assert re.fullmatch(r"(test_\w+\.<locals>\.)?helper\(\) got an unexpected keyword argument "
                      r"'unknown'(\. Did you mean 'known'\?)?", str(info.value))
  cell = Raises(rngs=nnx.Rngs(0))
  with pytest.raises(TypeError) as info:
    cell(cell.initialize_carry((2, 3)), jnp.ones((2, 3)))  # through the decorated __call__
  assert str(info.value) == "step() got an unexpected keyword argument 'seq_length'"
  # The library's own checks, raised in the bodies, keep their messages.
  with pytest.raises(TypeError, match=m('LSTMCell: `rngs` expected an nnx.Rngs, got NoneType.')):
    nr.LSTMCell(3, 4, rngs=None)
  with pytest.raises(TypeError, match=m('RNN: `time_major` expected a bool')):
    BUILDERS['RNN'](time_major='yes')


def test_compat_keeps_flax_linens_messages_without_private_names():
  # Constructors are dataclasses, as flax.linen's: the same message.
  for ours, theirs in [(lambda: compat.LSTMCell(3, foo=1), lambda: nn.LSTMCell(3, foo=1)),
                       (lambda: compat.RNN(compat.GRUCell(3), batch_first=True),
                        lambda: nn.RNN(nn.GRUCell(3), batch_first=True))]:
    with pytest.raises(TypeError) as a:
      ours()
    with pytest.raises(TypeError) as b:
      theirs()
    assert str(a.value) == str(b.value)
  # A cell's step and initialize_carry were compat's private _Cell's.
  carry = (jnp.zeros((2, 3)),) * 2
  for ours, theirs in [(compat.LSTMCell(3), nn.LSTMCell(3)), (compat.GRUCell(3), nn.GRUCell(3))]:
    c = carry if isinstance(ours, compat.LSTMCell) else carry[0]
    variables = theirs.init(jax.random.key(0), c, X[:, 0])
    messages = []
    for module in (ours, theirs):
      with pytest.raises(TypeError) as info:
        module.apply(variables, c, X[:, 0], foo=1)
      messages.append(str(info.value))
      with pytest.raises(TypeError) as info:
        module.initialize_carry(jax.random.key(0), (2, 3), foo=1)
      messages.append(str(info.value))
    assert messages[:2] == messages[2:], messages
    assert messages[0].startswith(f'{type(ours).__name__}.__call__()')


# -- the mechanism leaves everything else as it was ------------------------------------
METHODS = [(name, method) for name in nr.__all__ if isinstance(getattr(nr, name), type)
           and issubclass(getattr(nr, name), nnx.Module)  # not DropoutMasks, RNNBase (a Protocol)
           for method in ('__init__', '__call__', 'initialize_carry')
           if method in dir(getattr(nr, name))]


@pytest.mark.parametrize('name,method', METHODS)
def test_signatures_docstrings_and_help_are_the_methods_own(name, method):
  cls = getattr(nr, name)
  fn = getattr(cls, method)
  inner = inspect.unwrap(fn)
  assert inspect.signature(fn) == inspect.signature(inner)
  assert (fn.__doc__, fn.__name__, fn.__qualname__, fn.__module__) == (
    inner.__doc__, inner.__name__, inner.__qualname__, inner.__module__)
  # help(): the method's own signature line and docstring (help() of each method was
  # compared with the undecorated code's, character for character, when this was written;
  # a constructor without a docstring shows object.__init__'s, as before).
  assert (pydoc.plaintext.document(fn).splitlines()[0]
          == pydoc.plaintext.document(inner).splitlines()[0])
  assert inspect.getdoc(fn) == (inspect.cleandoc(inner.__doc__) if inner.__doc__
                                else inspect.getdoc(object.__init__))
  flax_cls = getattr(nnx, name, None)
  if flax_cls is not None and hasattr(flax_cls, method):  # the same first parameters as flax's
    theirs = [p for p in inspect.signature(getattr(flax_cls, method)).parameters.values()
              if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    ours = list(inspect.signature(fn).parameters.values())[:len(theirs)]
    assert [p.name for p in ours] == [p.name for p in theirs]


def test_signatures_are_exactly_as_before():
  # Spelled out: what tests/test_dropin.py and the docs rely on.
  assert str(inspect.signature(nr.LSTM.__call__)) == (
    "(self, inputs: 'ArrayOrNumPy', *, initial_carry: 'Any' = None, seq_lengths: "
    "'ArrayOrNumPy | None' = None, segment_ids: 'ArrayOrNumPy | None' = None, "
    "return_carry: 'bool | None' = None, time_major: "
    "'bool | None' = None, reverse: 'bool | None' = None, keep_order: 'bool | None' = None, "
    "rngs: 'RngsLike' = None)")
  assert str(inspect.signature(nr.LSTMCell.__call__)) == (
    "(self, carry: 'Carry', inputs: 'Array', **options: 'Any') -> 'tuple[Carry, Array]'")
  assert str(inspect.signature(nr.StackedRNN.__init__)) == (
    "(self, *layers, dropout_rate: 'float' = 0.0, time_major: 'bool | None' = None, "
    "return_carry: 'bool' = False, rngs: 'nnx.Rngs | None' = None)")
  assert list(inspect.signature(nr.RNN.__init__).parameters) == [
    'self', 'cell', 'time_major', 'return_carry', 'reverse', 'keep_order', 'unroll', 'remat',
    'state_axes', 'broadcast_rngs', 'learn_initial_carry', 'rngs']


def test_decorated_modules_go_through_flax_transforms_copies_and_pickle():
  rngs = nnx.Rngs(0)
  rnn = nr.RNN(nr.LSTMCell(3, 4, rngs=rngs))
  lstm = nr.LSTM(3, 4, num_layers=2, rngs=rngs)
  for module in (rnn, lstm):
    want = module(X)
    graphdef, state = nnx.split(module)
    np.testing.assert_allclose(nnx.merge(graphdef, state)(X), want, atol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda mod, x: mod(x))(module, X), want, atol=1e-6)
    np.testing.assert_allclose(copy.deepcopy(module)(X), want, atol=1e-6)
  assert nnx.eval_shape(lambda: nr.LSTM(3, 4, rngs=nnx.Rngs(0))(X)).shape == (2, 5, 4)

  # nnx.scan over a stack of modules (built by nnx.vmap: __init__ under a transform).
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(rngs):
    return nr.GRUCell(4, 4, rngs=rngs)

  cells = make(nnx.Rngs(1))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def through(h, cell):
    return cell(h, h)[0]

  h = through(jnp.ones((2, 4)), cells)
  h_ref = jnp.ones((2, 4))
  for i in range(3):
    cell = nr.GRUCell(4, 4, rngs=nnx.Rngs(0))
    nnx.update(cell, jax.tree.map(lambda a: a[i], nnx.state(cells)))  # noqa: B023
    h_ref = cell(h_ref, h_ref)[0]
  np.testing.assert_allclose(h, h_ref, atol=1e-6)

  # Plain pickle where it works (no jax function among the attributes: a conv cell's).
  conv = nr.ConvLSTMCell(2, 3, (3,), rngs=rngs)
  x = jnp.ones((2, 6, 2))
  carry = conv.initialize_carry(x.shape)
  _, want = conv(carry, x)
  again = pickle.loads(pickle.dumps(conv))
  np.testing.assert_allclose(again(carry, x)[1], want, atol=1e-6)
  assert pickle.loads(pickle.dumps(nr.LSTM.__call__)) is nr.LSTM.__call__
  state = pickle.loads(pickle.dumps(nnx.state(lstm)))
  assert jax.tree.structure(state) == jax.tree.structure(nnx.state(lstm))


def test_nnx_tabulate_and_the_base_methods_still_recognised():
  # overrides() sees through the decorator: the base's initialize_carry is the base's.
  from nnx_recurrent._base import overrides

  cell = nr.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  assert not overrides(cell, 'initialize_carry') and not overrides(cell, '__call__')
  table = nnx.tabulate(nr.RNN(cell), X)
  assert 'LSTMCell' in table


# -- gaps found by mutation testing of _checks ---------------------------------------------
def test_pytorchs_c_0_gets_the_initial_carry_hint():
  lstm = abstract(lambda: nr.LSTM(3, 4, rngs=nnx.Rngs(0)))
  h = jnp.zeros((1, 2, 4))
  for keyword in ('h_0', 'c_0'):
    raises([f"LSTM.__call__() got an unexpected keyword argument '{keyword}'. PyTorch's h_0 and "
            'c_0 are initial_carry here (an LSTM carry is (c, h), c first).'],
           lambda keyword=keyword: lstm(X, **{keyword: h}))


def test_the_lstm_carry_order_is_given_where_the_layer_carries_an_lstms():
  # PyTorch's hx to a layer of LSTM cells (this package's, flax.nnx's, convolutional,
  # layer-normed, nested in a stack): the hint gives the order (c, h); to a layer of GRUs it
  # would only mislead, and ends at the name.
  order = "PyTorch's hx is initial_carry here (an LSTM carry is (c, h), c first)."
  plain = "PyTorch's hx is initial_carry here."
  def rnn(cell, in_features=3):
    return nr.RNN(cell(in_features, 4, rngs=nnx.Rngs(0)))

  cases = [
    (lambda: rnn(nnx.LSTMCell), 'RNN', order),
    (lambda: rnn(nnx.GRUCell), 'RNN', plain),
    (lambda: nr.StackedRNN(rnn(nr.GRUCell), rnn(nr.LayerNormLSTMCell, 4)), 'StackedRNN', order),
    (lambda: nr.Bidirectional(rnn(nr.MGUCell), rnn(nr.MGUCell)), 'Bidirectional', plain),
    (lambda: nr.GRU(3, 4, num_layers=2, rngs=nnx.Rngs(0)), 'GRU', plain),
  ]
  for build, name, hint in cases:
    message = raises([f"{name}.__call__() got an unexpected keyword argument 'hx'. {hint}"],
                     lambda build=build: abstract(build)(X, hx=None))
    assert ('(c, h)' in message) == (hint == order), message
  conv = nr.RNN(nr.ConvLSTMCell(3, 4, (3,), rngs=nnx.Rngs(0)))
  raises(["RNN.__call__() got an unexpected keyword argument 'h_0'. PyTorch's h_0 and c_0 are "
          'initial_carry here (an LSTM carry is (c, h), c first).'],
         lambda: conv(jnp.ones((2, 5, 6, 3)), h_0=None))
  gru = abstract(lambda: nr.GRU(3, 4, rngs=nnx.Rngs(0)))
  raises(["GRU.__call__() got an unexpected keyword argument 'h_0'. PyTorch's h_0 and c_0 are "
          'initial_carry here.'], lambda: gru(X, h_0=None))


def test_a_private_base_class_is_never_named():
  # A super() call that skips the public class lands in a private base's method:
  # the class the user built is named, not _ConvCell (raises() checks that).
  class Skips(nr.ConvGRUCell):
    def __init__(self, *, rngs):
      super(nr.ConvGRUCell, self).__init__(2, 3, (3,), rngs=rngs, hidden_size=3)

  raises(["Skips.__init__() got an unexpected keyword argument 'hidden_size'. PyTorch's "
          'hidden_size is hidden_features here.'], lambda: Skips(rngs=nnx.Rngs(0)))
