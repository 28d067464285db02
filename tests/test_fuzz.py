"""The differential fuzzer (fuzz/, ``make fuzz``): every family runs a few
cases clean, and the harness catches a planted bug with a seed that replays it.
The campaigns themselves run outside the suite (``make fuzz``)."""

import functools
import json
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fuzz import (
  _core,
  carry_family,
  errors_family,
  explicit_family,
  layers_family,
  linen_family,
  linen_transforms_family,
  migrate_family,
  nnx_family,
  state_family,
  streaming_family,
  transforms_family,
)
from fuzz.__main__ import main
from nnx_recurrent import _base, _checks, _conv, _scan, _stack, compat
from nnx_recurrent.compat import _convert, _migrate


def _seeds(n, seed=0):
  return [_core.case_seed(seed, i) for i in range(n)]


@pytest.mark.parametrize('family', [nnx_family, linen_family, errors_family, migrate_family],
                         ids=['nnx', 'linen', 'errors', 'migrate'])
def test_families_run_clean(family):
  report = _core.run_cases('smoke', family.run, _seeds(3))
  assert report['cases'] == 3
  assert report['failures'] == []
  if family is not errors_family:  # the differential families compared numbers
    assert report['largest_abs_error'], report
    # (In reduced precision, '... [bfloat16]', the share below is what reads.)
    assert max(v for k, v in report['largest_abs_error'].items() if '[' not in k) < 1e-4
    assert report['largest_tolerance_share'].keys() == report['largest_abs_error'].keys()
    assert max(report['largest_tolerance_share'].values()) <= 1


def test_a_difference_is_recorded_as_a_share_of_its_tolerance():
  # What the report prints beside |ours - theirs|: large gradients have large differences.
  case = _core.Case(0, np.random.default_rng(0))
  case.close('big', [np.float32(1e5 + 0.5)], [np.float32(1e5)], atol=0.0, rtol=1e-5)
  case.close('small', [np.array([1.0, 2.0], np.float32)], [np.array([1.0, 2.0], np.float32)])
  case.close('exact', [np.zeros(2)], [np.zeros(2)], atol=0.0, rtol=0.0)
  assert case.errors == {'big': 0.5, 'small': 0.0, 'exact': 0.0}
  np.testing.assert_allclose(case.shares['big'], 0.5, rtol=1e-6)  # 0.5 of 1e5 * 1e-5 = 1
  assert case.shares['small'] == 0.0 and case.shares['exact'] == 0.0
  with pytest.raises(_core.Mismatch, match=r'max \|ours - theirs\| = 0.5'):
    case.close('big', [np.float32(1e5 + 0.5)], [np.float32(1e5)], atol=0.0, rtol=1e-6)
  np.testing.assert_allclose(case.shares['big'], 5.0, rtol=1e-6)  # recorded, then refused
  with pytest.raises(_core.Mismatch):
    case.close('exact', [np.ones(1)], [np.zeros(1)], atol=0.0, rtol=0.0)
  assert case.shares['exact'] == np.inf


def test_user_cells_with_odd_carries_against_numpy_run_clean():
  # Both ways through the probe: a shared vector of the batch's size, with lengths.
  force = dict(batch_axes=1, batch_0=3, shared=3, lengths=True, time=5)
  # compat's keep_order over the shared vector of the batch's size: reordered by
  # its shape, as flax.linen's flip_sequences does.
  by_shape = {**force, 'layer': 'compat', 'reverse': True, 'keep_order': True, 'total': False,
              'emit_shared': True}
  for forced in ({}, {**force, 'layer': 'nr'}, {**force, 'layer': 'compat'}, by_shape):
    report = _core.run_cases('carry', carry_family.run, _seeds(3), force=forced)
    assert report['failures'] == [], report['failures']
    assert max(report['largest_abs_error'].values()) < 1e-4, report


@pytest.mark.parametrize('layer', ['nr', 'compat'])
def test_a_shared_carry_leaf_taken_for_a_rows_is_found(monkeypatch, layer):
  """Without the probe (every leaf judged by its shape), a shared ``(3,)`` leaf
  in a batch of 3 is frozen at each row's padding: the reference finds it."""
  force = dict(layer=layer, batch_axes=1, batch_0=3, shared=3, lengths=True, time=5,
               reverse=False, return_carry=True)  # (compat masks only then)
  if layer == 'nr':
    monkeypatch.setattr(_scan, 'cell_rows', lambda *args: _scan.Rows())
  else:
    from nnx_recurrent.compat import _rnn
    monkeypatch.setattr(_rnn, '_carry_rows', lambda *args: _scan.Rows())
  report = _core.run_cases('carry', carry_family.run, _seeds(3), force=force)
  assert report['failures'], report
  assert all('Mismatch' in f['error'] for f in report['failures']), report['failures']


def test_odd_carries_under_an_explicit_mesh_run_clean_and_a_split_shared_leaf_is_found(
    monkeypatch):
  """On an Explicit ``data`` axis (one device here), a shared ``(3,)`` leaf in a
  batch of 3 without lengths stays whole; told apart only with padding (the
  scan core before session 55), it came back split over ``data``."""
  force = dict(mesh=True, batch_axes=1, batch_0=3, shared=3, lengths=False, return_carry=True)
  for layer in ('nr', 'compat'):
    report = _core.run_cases('carry', carry_family.run, _seeds(2), force={**force, 'layer': layer})
    assert report['failures'] == [], report['failures']
  from nnx_recurrent._scan import _cell

  monkeypatch.setattr(_cell, 'splits_rows', lambda *args: False)  # nr.RNN's
  monkeypatch.setattr(_scan, 'splits_rows', lambda *args: False)  # compat.RNN's
  for layer in ('nr', 'compat'):
    failures = _core.run_cases('carry', carry_family.run, _seeds(2),
                               force={**force, 'layer': layer})['failures']
    assert len(failures) == 2 and all(
      re.search(r"Mismatch: (carry|output) s split as .*'data'", f['error'])
      for f in failures), failures


def test_fused_layers_against_flax_stacks_run_clean():
  report = _core.run_cases('fused', nnx_family.fused_case, _seeds(2))
  assert report['failures'] == []
  assert 'forward layer 0 gradients' in report['largest_abs_error']


def test_a_bug_in_the_pallas_kernels_loads_ahead_is_found(monkeypatch):
  """Pallas cases draw the kernels' settings (``fuzz._common.PALLAS_SETTINGS``):
  a planted bug in the loads-ahead path (each step fed the next step's loads)
  is found in the fused case against flax.nnx, and the same case without
  loads ahead, which the plant leaves alone, runs clean."""
  from nnx_recurrent._fused import _pallas_kernels

  time_loop = _pallas_kernels._time_loop

  def one_step_late(lay, step, load, init):
    if not lay.settings.prefetch:
      return time_loop(lay, step, load, init)

    def body(i, both):
      ahead = load(jnp.minimum(i + 1, lay.time - 1))
      return step(i, both[0], ahead), ahead  # the plant: the next step's loads

    return jax.lax.fori_loop(0, lay.time, body, (init, load(0)))[0]

  monkeypatch.setattr(_pallas_kernels, '_time_loop', one_step_late)
  force = {'implementation': 'pallas', 'pallas_settings': {'prefetch': True}, 'time': 3,
           'batch_axes': 0}
  report = _core.run_cases('fused', nnx_family.fused_case, _seeds(1), force=force)
  assert len(report['failures']) == 1 and report['failures'][0]['error'].startswith('Mismatch')
  clean = _core.run_cases('fused', nnx_family.fused_case, _seeds(1),
                          force={**force, 'pallas_settings': {'prefetch': False}})
  assert clean['failures'] == []


@pytest.mark.parametrize('family', ['fused', 'torch'])
def test_a_bug_in_the_gpu_scan_plan_is_found(monkeypatch, family):
  """XLA cases draw a GPU's scan plan too (``fuzz._common.scan_plan``: the
  default on every GPU, run on the CPU): a planted bug in scans unrolled 8
  times (each output 1% off) is found in the fused case against flax.nnx and
  against PyTorch, and the same case with the CPU's plan runs clean."""
  from nnx_recurrent._fused import _xla

  if family == 'torch':
    pytest.importorskip('torch')
    from fuzz import torch_family
    case = torch_family.run
  else:
    case = nnx_family.fused_case
  scan = _xla.prefetch_scan

  def wrong_when_unrolled(step, carry, xs, **kw):
    carry, ys = scan(step, carry, xs, **kw)
    if kw['unroll'] == 8:
      ys = jax.tree.map(lambda y: y * 1.01 if jnp.issubdtype(y.dtype, jnp.floating) else y, ys)
    return carry, ys

  monkeypatch.setattr(_xla, 'prefetch_scan', wrong_when_unrolled)
  force = {'implementation': 'xla', 'scan_plan': 'gpu', 'time': 3}
  report = _core.run_cases(family, case, _seeds(1), force=force)
  assert len(report['failures']) == 1
  assert report['failures'][0]['error'].startswith('Mismatch'), report['failures'][0]
  clean = _core.run_cases(family, case, _seeds(1), force={**force, 'scan_plan': 'default'})
  assert clean['failures'] == []


# Packed rows of 4 steps: segments, padding between them, a stack of layers.
SMALL = dict(masking='segments', batch_axes=1, batch0=2, time=4)


def _stack_runs_clean(force, seed):
  """A stacked layer tree of one case: no failure, zero input gradients at
  padding (the seeds here draw some), outputs, carries and gradients compared."""
  report = _core.run_cases('layers', layers_family.run, _seeds(1, seed=seed),
                           force={**force, 'top.kind': 'stacked'})
  assert report['failures'] == []
  assert report['largest_abs_error']['input gradients at padding (zeros)'] == 0
  assert {'outputs (segments)', 'carry', 'cell 0 gradients'} <= set(report['largest_abs_error'])


def test_nested_layers_against_step_loops_run_clean():
  _stack_runs_clean(SMALL, seed=1)  # (seed 1 draws padding)


def test_streamed_layers_against_step_loops_run_clean():
  report = _core.run_cases('streaming', streaming_family.run, _seeds(1),
                           force={**SMALL, 'initial_carry': 1, 'cuts': 2})
  assert report['failures'] == []
  assert {'outputs (segments)', 'carry', 'cell 0 gradients'} <= set(report['largest_abs_error'])


@pytest.mark.parametrize('low', [False, True], ids=['float32', 'bfloat16'])
def test_compat_packed_against_linen_loops_runs_clean(low):
  force = dict(batch_axes=1, batch0=2, time=4, low_precision=low)
  if low:  # bfloat16 compute over float32 parameters and carry
    force.update(dtype='bfloat16', param_dtype='float32', inputs_dtype='float32', cell='LSTMCell')
  report = _core.run_cases('packed', linen_family.packed_case, _seeds(1), force=force)
  assert report['failures'] == []
  suffix = ' [bfloat16]' if low else ''
  assert set(report['largest_abs_error']) == {
    f'packed outputs (zeros at padding){suffix}', f'packed carry{suffix}',
    f'packed gradients{suffix}'}


def test_a_carry_leaking_into_the_next_segment_is_found(monkeypatch):
  # No resets: a row's later segments go on from the carry of the one before.
  monkeypatch.setattr(_scan._layout, 'segments_to_masks', lambda ids: _scan.StepMasks(
    ids != 0, jnp.zeros_like(ids, bool)))
  force = {**SMALL, 'batch0': 3, 'time': 6, 'top.kind': 'rnn'}
  report = _core.run_cases('layers', layers_family.run, _seeds(2), force=force)
  assert len(report['failures']) == 2, report
  # (The carry, where the outputs cannot show it: a layer-normalized cell of one unit.)
  assert all(f['error'].startswith(('Mismatch: outputs (segments)', 'Mismatch: carry'))
             for f in report['failures'])


def test_stateful_user_cells_against_flax_nnx_run_clean():
  report = _core.run_cases('state', state_family.run, _seeds(2),
                           force=dict(counter=True, running_mean=True, call='grad'))
  assert report['failures'] == []
  assert report['largest_abs_error']['call 1: cell 0 state'] < 1e-6  # compared, to rounding


def test_a_cell_over_array_refs_runs_clean_and_lost_state_is_found(monkeypatch):
  # nr's layers over flax's array refs under plain jax.jit, against flax.nnx's
  # under nnx.jit; then the plain copy's changes not written back: the counter
  # and the dropout stream stay where they were.
  force = dict(counter=True, dropout_rate=0.5, call='refs', batch_axes=1, time=3)
  report = _core.run_cases('state', state_family.run, _seeds(1), force=force)
  assert report['failures'] == [], report
  real = _scan._core.with_plain_variables
  monkeypatch.setattr(_scan._core, 'with_plain_variables',
                      lambda cell: None if (p := real(cell)) is None else (p[0], lambda: None))
  report = _core.run_cases('state', state_family.run, _seeds(1), force=force)
  assert len(report['failures']) == 1, report
  assert report['failures'][0]['error'].startswith('Mismatch: call 0: cell 0 state')


def test_a_dropout_stream_not_held_over_the_steps_is_found(monkeypatch):
  # broadcast_rngs ignored: the cell's nnx.Dropout draws a new mask at every
  # step where flax.nnx holds one per call.
  monkeypatch.setattr(_scan._core, 'nnx_state_axes', lambda state_axes=None, broadcast_rngs=None:
                      nnx.StateAxes(state_axes or {...: nnx.Carry}))
  force = dict(dropout_rate=0.5, broadcast_rngs=True, bidirectional=False, call='eager',
               batch_axes=1, time=4)
  report = _core.run_cases('state', state_family.run, _seeds(2), force=force)
  assert len(report['failures']) == 2, report
  assert all(f['error'].startswith('Mismatch: call 0: outputs at valid steps')
             for f in report['failures'])


def test_torch_family_runs_clean():
  pytest.importorskip('torch')
  from fuzz import torch_family

  report = _core.run_cases('torch', torch_family.run, _seeds(2, seed=1))
  assert report['failures'] == []
  assert 'gradient of weight_ih' in report['largest_abs_error']


def _off_by(delta):
  """A cell step whose output is ``delta`` off: a bug to be found."""
  call = _base.RNNCellBase._call

  def wrong(self, carry, inputs, options, keep_carry_dtype):
    carry, y = call(self, carry, inputs, options, keep_carry_dtype)
    return carry, y + delta

  return wrong


def test_a_wrong_output_is_found_and_replays(monkeypatch):
  monkeypatch.setattr(_base.RNNCellBase, '_call', _off_by(1e-3))
  plain = dict(low_precision=False)  # 1e-3 is within bfloat16's rounding
  report = _core.run_cases('nnx', nnx_family.cell_case, _seeds(2), force=plain)
  assert len(report['failures']) == 2
  failure = report['failures'][0]
  assert failure['error'].startswith('Mismatch: ') and 'step' in failure['error']
  assert max(report['largest_tolerance_share'].values()) > 1  # recorded for failed cases too
  assert 'cell' in failure['config'] and 'hidden' in failure['config']
  replay = _core.run_cases('nnx', nnx_family.cell_case, [failure['seed']], force=plain)
  assert replay['failures'][0]['config'] == failure['config']  # the same case again
  monkeypatch.undo()
  assert _core.run_cases('nnx', nnx_family.cell_case, [failure['seed']],
                         force=plain)['failures'] == []


def test_an_unchecked_argument_is_found(monkeypatch, tmp_path, capsys):
  # seq_lengths and segment_ids unchecked: bad ones reach jax (or run), which the
  # family reports.
  monkeypatch.setattr(_checks, 'check_integer_array', lambda where, arg, x, *a, **k:
                      jnp.asarray(x))
  out = tmp_path / 'sub' / 'report.json'
  code = main(['--family', 'errors', '--cases', '40', '--seed', '0', '--out', str(out),
               '--force', "kind='call'"])
  assert code == 1
  [report] = json.loads(out.read_text())
  assert report['failures'], report
  assert {f['config']['argument'] for f in report['failures']} <= {"'seq_lengths'",
                                                                   "'segment_ids'"}
  printed = capsys.readouterr().out
  # The replay forces what the run forced: without it, another case.
  assert (f"python -m fuzz --family errors --replay {report['failures'][0]['seed']} "
          "--force \"kind='call'\"\n") in printed


def test_layers_composed_on_another_number_of_feature_axes_are_found(monkeypatch):
  # The feature axes left unchecked: a StackedRNN or Bidirectional of layers
  # that read different steps is built, and runs on.
  force = {'kind': 'constructor', 'constructor': 'composition', 'fault': 'axes'}
  assert _core.run_cases('errors', errors_family.run, _seeds(4), force=force)['failures'] == []
  monkeypatch.setattr(_stack, 'check_reads_axes', lambda *a: None)
  failures = _core.run_cases('errors', errors_family.run, _seeds(4), force=force)['failures']
  assert len(failures) == 4
  assert {f['error'] for f in failures} <= {'Mismatch: the bad `layers[1]` ran',
                                            'Mismatch: the bad `backward_rnn` ran'}, failures


# compat's ConvLSTMCell in an RNN against flax.linen's: 'CIRCULAR' padding
# over 4 points with a kernel of 3, which the hidden convolution keeps.
CONV_LINEN = {'mode': 'rnn', 'cell': 'ConvLSTMCell', 'spatial_axes': 1, 'spatial0': 4,
              'kernel0': 3, 'padding': 'CIRCULAR', 'low_precision': False}


def test_compat_conv_lstm_against_flax_linen_runs_clean():
  report = _core.run_cases('linen', linen_family.run, _seeds(2), force=CONV_LINEN)
  assert report['failures'] == []
  assert report['largest_abs_error']['outputs (padding included)'] == 0  # flax's own values


def test_a_hidden_convolution_of_another_padding_is_found(monkeypatch):
  # The hidden convolution given 'SAME' whatever the padding: flax.linen's
  # takes 'CIRCULAR', as the input convolution does. compat caches the cells
  # it builds per configuration: none built before the plant, or with it, is kept.
  _convert._abstract_cached.cache_clear()
  monkeypatch.setattr(_conv, '_shape_keeping', lambda padding, kernel_size: 'SAME')
  try:
    failures = _core.run_cases('linen', linen_family.run, _seeds(2),
                               force=CONV_LINEN)['failures']
  finally:
    _convert._abstract_cached.cache_clear()
  assert len(failures) == 2, failures
  assert all('outputs (padding included)' in f['error'] for f in failures), failures


# Reduced precision: bfloat16 compute over float32 parameters and carry, the
# cells flax.nnx and flax.linen run in it.
LOW = dict(low_precision=True, dtype='bfloat16', param_dtype='float32', inputs_dtype='float32',
           cell='LSTMCell', mode='rnn', batch_axes=1)


@pytest.mark.parametrize('family', [nnx_family, linen_family], ids=['nnx', 'linen'])
def test_low_precision_against_flax_runs_clean(family):
  report = _core.run_cases('low', family.run, _seeds(1), force=LOW)
  assert report['failures'] == []
  compared = {k for k in report['largest_abs_error'] if k.endswith('[bfloat16]')}
  assert {'outputs at valid steps [bfloat16]', 'parameter gradients [bfloat16]'} <= compared \
      or {'outputs (padding included) [bfloat16]', 'gradients [bfloat16]'} <= compared, report


@pytest.mark.parametrize('family', [nnx_family, linen_family], ids=['nnx', 'linen'])
def test_a_cell_changing_its_carrys_dtype_is_compared_with_flax_casting_it_back(family):
  # flax's SimpleCell(dtype=bfloat16) over a float32 carry returns a bfloat16
  # one, which flax's RNN refuses and ours casts back: the reference is then
  # flax's RNN over the cell wrapped in CastBack.
  force = {**LOW, 'cell': 'SimpleCell', 'mode': 'bidirectional'}
  case = _core.Case(_seeds(1)[0], np.random.default_rng(_seeds(1)[0]), force=force)
  family.run(case)
  assert case.config['flax.nnx' if family is nnx_family else 'flax.linen'].endswith('CastBack')
  assert {k for k in case.errors if k.startswith(('outputs', 'carry (rows of length > 0)'))
          and k.endswith('[bfloat16]')}, case.errors
  assert any('gradients [bfloat16]' in k for k in case.errors), case.errors


def test_outputs_in_another_dtype_than_flaxs_are_found(monkeypatch):
  # A step whose outputs come back in float32: the same numbers, the wrong dtype.
  call = _base.RNNCellBase._call

  def upcast(self, carry, inputs, options, keep_carry_dtype):
    carry, y = call(self, carry, inputs, options, keep_carry_dtype)
    return carry, y.astype(jnp.float32)

  monkeypatch.setattr(_base.RNNCellBase, '_call', upcast)
  force = {**LOW, 'mode': 'cell', 'param_dtype': 'bfloat16', 'inputs_dtype': 'bfloat16'}
  report = _core.run_cases('nnx', nnx_family.run, _seeds(2), force=force)
  assert len(report['failures']) == 2, report
  assert all(f['error'].startswith('Mismatch: LSTMCell step: dtypes') for f in report['failures'])


# Convolutional cells: steps of (*spatial, channels).
CONV = {**SMALL, 'features': 'conv', 'spatial_axes': 2}


def test_convolutional_layers_against_step_loops_run_clean():
  # (Seed 2 draws padding between segments, and paddings (low, high) pairs,
  # 'REFLECT' in a Bidirectional and 'VALID'.)
  _stack_runs_clean(CONV, seed=2)


def test_a_mask_broadcast_over_one_feature_axis_is_found_by_convolutional_cases(monkeypatch):
  # Masks given one trailing axis: right for vector features, wrong for (h, w, c).
  for module in (_scan._masking, _scan._layout):  # (masked_where reads _masking's)
    monkeypatch.setattr(module, 'bcast', lambda m, x: m[..., None])
  force = {**CONV, 'top.kind': 'rnn'}
  assert len(_core.run_cases('layers', layers_family.run, _seeds(2), force=force)['failures']) \
      == 2
  force['features'] = 'vector'
  assert _core.run_cases('layers', layers_family.run, _seeds(1), force=force)['failures'] == []


def test_a_state_shape_that_ignores_the_padding_is_found(monkeypatch):
  # The state's spatial shape computed as if the padding were 'SAME': right
  # for 'SAME', wrong for 'VALID' (a 3x3 kernel over 4x4 points: 2x2 outputs).
  shape = _conv._conv_spatial_shape
  monkeypatch.setattr(_conv, '_conv_spatial_shape',
                      lambda spatial, kernel, strides, padding: shape(spatial, kernel, strides,
                                                                      'SAME'))
  force = {**CONV, 'top.kind': 'rnn', 'spatial0': 4, 'spatial1': 4, 'top.strides': 1,
           'top.kernel0': 3, 'top.kernel1': 3, 'top.padding': 'VALID'}
  report = _core.run_cases('layers', layers_family.run, _seeds(1), force=force)
  assert len(report['failures']) == 1, report
  assert 'incompatible shapes' in report['failures'][0]['error']
  force['top.padding'] = 'SAME'
  assert _core.run_cases('layers', layers_family.run, _seeds(1), force=force)['failures'] == []


def test_choices_forced_from_the_command_line(tmp_path, capsys):
  out = tmp_path / 'report.json'
  argv = ['--family', 'nnx', '--cases', '2', '--out', str(out)]
  assert main([*argv, '--force', "mode='cell'", '--force', "cell='GRUCell'"]) == 0
  [report] = json.loads(out.read_text())
  assert {k.split(' [')[0] for k in report['largest_abs_error']} <= {
    'init GRUCell', 'init bias_hn (zeros)', 'initialize_carry', 'GRUCell step'}, report
  for bad in ('mode', 'mode=cell'):  # no value; a value that is no Python literal
    with pytest.raises(SystemExit):
      main([*argv, '--force', bad])
    assert '--force expected NAME=VALUE' in capsys.readouterr().err


# Variational dropout (one mask per row, shared by its steps and segments) in
# an RNN over a packed batch.
DROPOUT = {**SMALL, 'features': 'vector', 'in_features': 4, 'top.kind': 'rnn',
           'top.cell': 'MGUCell', 'top.hidden': 4, 'top.dropout': True, 'top.dropout_rate': 0.5,
           'top.recurrent_dropout_rate': 0.5}


def test_variational_dropout_against_step_loops_given_the_masks_runs_clean():
  report = _core.run_cases('layers', layers_family.run, _seeds(1), force=DROPOUT)
  assert report['failures'] == []
  assert report['largest_abs_error']['input gradients at padding (zeros)'] == 0


@pytest.mark.parametrize('bug', ['masks dropped', 'one mask for every row'])
def test_dropout_masks_not_applied_per_row_are_found(monkeypatch, bug):
  draw = _scan.cell_dropout_masks

  def wrong(cell, step_shape, rngs, dtype):
    if bug == 'masks dropped':
      return None
    masks = draw(cell, (1, *step_shape[1:]), rngs, dtype)  # the first row's, for all
    return jax.tree.map(lambda m: jnp.broadcast_to(m, (step_shape[0], *m.shape[1:])), masks)

  monkeypatch.setattr(_scan, 'cell_dropout_masks', wrong)
  report = _core.run_cases('layers', layers_family.run, _seeds(2), force=DROPOUT)
  assert len(report['failures']) == 2, report
  assert all(f['error'].startswith('Mismatch: outputs (segments)') for f in report['failures'])


# Two cases the explicit family drew (seeds and choices as drawn) whose mask had
# the carry's shape (a hidden size of 1, split over a 'model' axis of size 1)
# split otherwise than the carry: ShardingTypeError from where() inside JAX before
# _scan.masked_where; the fused GRU (both directions, packed, a given carry) and
# compat.RNN (packed, reversed, dropout on).
_MASK_SPLIT_CASES = [
  (1571595088, dict(layer='gru', rows_per_device=1, time=4, features=2, hidden_per_device=1,
                    layers=1, bidirectional=True, split_parameters=True, masks='segment_ids',
                    initial_carry='rows', inputs='rows', masks_placed='rows',
                    split_batch_axis=0, second_batch_axis=None)),
  (2954317433, dict(layer='compat', cell0='LSTMCell', rows_per_device=1, time=1, features=1,
                    hidden_per_device=1, split_parameters=True, masks='segment_ids',
                    reverse=True, initial_carry='rows', inputs='rows', masks_placed='rows',
                    split_batch_axis=0, second_batch_axis=None)),
]


def test_explicit_family_runs_clean_and_finds_a_mask_split_otherwise_than_the_carry(monkeypatch):
  for seed, force in _MASK_SPLIT_CASES:
    report = _core.run_cases('explicit', explicit_family.run, [seed], force=force)
    assert report['failures'] == [], report['failures']
    assert set(report['largest_abs_error']) == {'gradients', 'outputs and carry'}

  def plain(mask, x, y):  # where()'s operands as they come
    return jnp.where(_scan._masking.bcast(mask, x), x, y)
  for module in (_scan, _scan._masking, _scan._steps):
    monkeypatch.setattr(module, 'masked_where', plain)
  seed, force = _MASK_SPLIT_CASES[1]
  failures = _core.run_cases('explicit', explicit_family.run, [seed], force=force)['failures']
  assert len(failures) == 1 and 'ShardingTypeError' in failures[0]['error'], failures


def test_an_explicit_replay_names_the_simulated_devices_its_mesh_was_drawn_from(monkeypatch,
                                                                                 capsys):
  # The family draws its mesh from the devices there are: a replay of a case
  # found on 8 simulated CPU devices needs them again (make fuzz runs on 8).
  from fuzz import __main__ as fuzz_main

  class Cpu:
    platform = 'cpu'

  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  monkeypatch.setattr(jax, 'devices', lambda: [Cpu()] * 8)
  monkeypatch.setattr(fuzz_main, 'run_cases', lambda name, run, seeds, **kw: dict(
    cases=1, failures=[dict(seed=seeds[0], error='E', config={})], seconds=0,
    largest_abs_error={}, largest_tolerance_share={}))
  for family, prefix in (('explicit', 'XLA_FLAGS=--xla_force_host_platform_device_count=8 '),
                         ('carry', '')):
    assert main(['--family', family, '--cases', '1', '--seed', '3']) == 1
    printed = capsys.readouterr().out
    assert f'  replay: {prefix}python -m fuzz --family {family} --replay ' in printed, printed
  Cpu.platform = 'gpu'  # GPUs: the flag adds no devices
  assert main(['--family', 'explicit', '--cases', '1', '--seed', '3']) == 1
  assert '  replay: python -m fuzz --family explicit' in capsys.readouterr().out


@pytest.mark.parametrize('force', [
  # An ensemble (nnx.split_rngs + nnx.vmap) of StackedRNNs over a user's stateful cell
  # (a counter, its own dropout stream), called in flax's tree mode;
  dict(transform='ensemble', mode='tree', cell='user', members=2, shared_inputs=False,
       dropout_rate=0.3, counter=True, running_mean=False, stacked=True),
  # two fused bidirectional GRUs called in turn by nnx.scan, with lengths.
  dict(transform='scan_layers', mode='graph', cell='GRU', implementation='xla', members=2,
       bidirectional=True, seq_lengths=True)], ids=['ensemble', 'scan_layers'])
def test_layers_under_flax_transforms_run_clean(force):
  # Inside nnx.grad, against flax.nnx's RNN under the same transforms: outputs,
  # carries, gradients and every Variable (each member's RNG key and count) after
  # each of two calls.
  report = _core.run_cases('transforms', transforms_family.run, _seeds(1),
                           force=dict(force, grad=True))
  assert report['failures'] == [], report['failures']
  errors = report['largest_abs_error']
  assert {'call 1: parameter gradients', 'call 1: Variables', 'call 1: outputs at valid steps'} \
      <= errors.keys(), errors
  assert max(errors.values()) < 1e-5, errors


@pytest.mark.skipif(not hasattr(nnx, 'set_graph_mode'), reason='flax without tree mode')
def test_a_scan_that_tree_mode_refuses_is_found(monkeypatch):
  # flax.nnx's RNN scans with flax's graph-mode transforms (flax.nnx.compat), which
  # thread a cell's state by StateAxes in tree mode too; plain nnx.scan refuses
  # StateAxes there, so a scan core "simplified" to it fails only in tree mode.
  monkeypatch.setattr(_scan._core, 'graph_nnx', types.SimpleNamespace(
    scan=nnx.scan, split_rngs=nnx.split_rngs))
  force = dict(transform='jit', mode='tree', cell='user', counter=True, grad=False)
  failures = _core.run_cases('transforms', transforms_family.run, _seeds(1), force=force)[
    'failures']
  assert len(failures) == 1, failures
  assert failures[0]['error'].startswith(
    'AssertionError: call 0: only nr raised: ValueError: `in_axes` cannot contain `StateAxes`')
  force['mode'] = 'graph'  # where nnx.scan takes StateAxes: the same case runs clean
  assert _core.run_cases('transforms', transforms_family.run, _seeds(1), force=force)[
    'failures'] == []


_LINEN_TRANSFORM_CASES = {
  # an ensemble of bidirectional layers (nn.vmap, the params RNG split), one batch each;
  'ensemble': dict(transform='ensemble', bidirectional=True, members=2, shared_inputs=False,
                   call='grad'),
  # GRU layers in turn by nn.scan, reversed, with lengths (0 among them: seed 16 draws
  # [3, 0] over 4 steps) and unroll=2.
  'scan_layers': dict(transform='scan_layers', cell='GRUCell', members=2, seq_lengths=True,
                      call='grad', unroll=2)}
_LINEN_TRANSFORM_SEEDS = {'ensemble': 0, 'scan_layers': 16}


@pytest.mark.parametrize('name', list(_LINEN_TRANSFORM_CASES))
def test_compat_under_linen_transforms_runs_clean(name):
  # compat.RNN / Bidirectional lifted by flax.linen's transforms, against flax.linen's:
  # the variables, outputs, carries and parameter gradients.
  report = _core.run_cases('linen_transforms', linen_transforms_family.run,
                           _seeds(1, seed=_LINEN_TRANSFORM_SEEDS[name]),
                           force=_LINEN_TRANSFORM_CASES[name])
  assert report['failures'] == [], report['failures']
  assert set(report['largest_abs_error']) == {'init', 'outputs', 'carry (rows of length > 0)',
                                              'parameter gradients'}
  assert max(report['largest_abs_error'].values()) < 1e-5


def test_a_wrong_output_under_linen_transforms_is_found(monkeypatch):
  real = compat.RNN.__call__
  monkeypatch.setattr(compat.RNN, '__call__', lambda self, *a, **k: jax.tree.map(
    lambda t: t + 1e-3, real(self, *a, **k)))
  failures = _core.run_cases('linen_transforms', linen_transforms_family.run, _seeds(1),
                             force=_LINEN_TRANSFORM_CASES['ensemble'])['failures']
  assert len(failures) == 1 and failures[0]['error'].startswith('Mismatch: outputs'), failures


def test_only_a_missing_torch_skips_a_family(monkeypatch, capsys):
  # torch is an extra: without it the torch family is skipped; any other import
  # error of a family (a name it imports that is gone) fails the run.
  from fuzz import __main__ as fuzz_main

  def missing(module):
    def family(name):
      raise ModuleNotFoundError(f"No module named '{module}'", name=module)
    return family

  monkeypatch.setattr(fuzz_main, 'family', missing('torch'))
  assert main(['--family', 'torch', '--cases', '1']) == 0
  assert "torch: skipped (No module named 'torch')" in capsys.readouterr().out
  monkeypatch.setattr(fuzz_main, 'family', missing('fuzz.gone'))
  with pytest.raises(ModuleNotFoundError, match='fuzz.gone'):
    main(['--family', 'carry', '--cases', '1'])

  def broken(name):
    raise ImportError("cannot import name 'on_paths_of' from 'fuzz._common'")
  monkeypatch.setattr(fuzz_main, 'family', broken)
  with pytest.raises(ImportError, match='on_paths_of'):
    main(['--family', 'transforms', '--cases', '1'])


# compat.to_nnx / from_nnx against flax.linen: a flax.linen RNN of GRUCells gating
# with hard_sigmoid, its kernels boxed by nn.with_logical_partitioning with rules but
# the first input kernel unboxed (to_nnx warns, the joined kernel has no sharding);
# or a user's subclass of the cell that redefines __call__, which to_nnx must refuse.
# One seed each: the forced case shows every plant; each force's clean run once.
MIGRATE = dict(cell='GRUCell', cell_class='flax', layer='rnn', low_precision=False,
               gate_fn='hard_sigmoid', partition_names=('data', 'model'),
               partition_box='logical rules', batch_axes=1, seq_lengths=False,
               params_per_step=False, boxes_apart=True)


@functools.cache
def _migrate_runs_clean(cell_class):
  force = dict(MIGRATE, cell_class=cell_class)
  return _core.run_cases('migrate', migrate_family.run, _seeds(1), force=force)['failures']


@pytest.mark.parametrize('bug,expected', [
  ('gate_fn dropped', 'Mismatch: outputs at valid steps'),
  ('partition boxes dropped', 'Mismatch: from_nnx variables: structure'),
  ('logical rules dropped', 'Mismatch: from_nnx variables: structure'),
  ('the joined kernel warning lost', 'AssertionError: to_nnx warned []'),
  ('a redefined __call__ converted', 'AssertionError: to_nnx converted a subclass')])
def test_a_conversion_bug_is_found_by_the_migrate_family(monkeypatch, bug, expected):
  cell_class = 'redefines' if 'redefined' in bug else 'flax'
  assert _migrate_runs_clean(cell_class) == []
  if bug == 'gate_fn dropped':  # the NNX cell (and from_nnx's) built with the default
    layout = _convert.LAYOUTS['GRUCell']
    monkeypatch.setitem(_convert.LAYOUTS, 'GRUCell', layout._replace(
      math_fields=tuple(f for f in layout.math_fields if f != 'gate_fn')))
  elif bug == 'partition boxes dropped':  # from_nnx: the parameters not boxed again
    monkeypatch.setattr(_convert, 'linen_box', lambda metadata, value: value)
  elif bug == 'the joined kernel warning lost':
    monkeypatch.setattr(_checks, 'warn', lambda *args, **kwargs: None)
  elif bug == 'logical rules dropped':  # session 56's bug: to_nnx kept the names only
    monkeypatch.setattr(_convert, '_box_metadata', lambda box: (
      {'out_sharding': box.names, 'linen_meta_type': nn.Partitioned}
      if isinstance(box, nn.meta.AxisMetadata) else None))
  else:  # session 55's bug: the subclass's method not looked at
    monkeypatch.setattr(_migrate, '_check_computes_as_builtin', lambda where, module: None)
  _convert._abstract_cached.cache_clear()  # no NNX cell structure built before the plant
  try:
    failures = _core.run_cases('migrate', migrate_family.run, _seeds(1),
                               force=dict(MIGRATE, cell_class=cell_class))['failures']
  finally:
    _convert._abstract_cached.cache_clear()
  assert len(failures) == 1, failures
  assert all(f['error'].startswith(expected) for f in failures), failures
