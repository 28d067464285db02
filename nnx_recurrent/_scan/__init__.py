"""The masked scan: the sequence engine behind every front door.

Everything here works on *time-major* arrays ``(time, *batch, *features)``;
the front doors move the time axis and call in. ``RNN`` (hence
``Bidirectional`` and ``StackedRNN``) scans with :func:`masked_scan`, compat's
``RNN`` runs :func:`step` / :func:`linen_step` under ``flax.linen.scan``, and
the fused layers' hand-differentiated scans (``_fused._xla``) use the same
input checks (:func:`prepare`), cleaning (:func:`clean_padding`) and carry
selection (:func:`keep_at_padding`).

Masking is *carry selection*: at a padding step the new carry is discarded
(``where(valid, new, old)``) and the output is zero, so the carry that comes
out of the scan is the one after each row's last valid step without storing
the carry history. Packed sequences add a *reset*: at the first step of each
segment but a row's first, the carry is replaced by the default initial carry
(the row's first segment goes on from the carry the call starts from, so a
chunk's carry passed on continues it). Leaves of the carry and of the
outputs that the rows share (a step counter, a ``(features,)`` statistic) go
on at padding and resets, as in flax; which they are the cell says where it
can (:class:`Rows`, :func:`cell_rows`), their shapes where it cannot
(:func:`per_row`).

A carry enters the scans typed as each step's carry will be
(:func:`like_inputs`): varying like the inputs inside ``jax.shard_map``, split
over the batch like them under a mesh of Explicit axes (JAX's explicit
sharding mode); there, parameters split over a mesh axis (model parallel over
the hidden axis) split each step's carry too, and the carry (a packed row's
reset carry with it) takes the sharding one step of the cell gives it, traced
abstractly (:func:`settle_carry`), and so do the cell's own Variables that the
scan carries (:func:`settle_cell_state`). Outside those two, nothing in the
programs changes.

The engine in parts, each importing only those before it: :mod:`._masking`
(the masks and carry selection), :mod:`._sharding` (carries typed for
``shard_map`` and explicit sharding), :mod:`._steps` (one step), :mod:`._cell`
(what the scans ask of a cell), :mod:`._layout` (the front doors' checks and
layout) and :mod:`._core` (:func:`masked_scan`). Every front door imports this
package and uses the names below.
"""

from nnx_recurrent._scan._cell import (  # noqa: F401 -- the engine's names
  carry_shapes,
  cell_dropout_masks,
  cell_rows,
  cell_step_rngs,
  default_carry,
  draws_call_rngs,
  initial_carry,
  needs_carry_rngs,
  per_use_rngs,
  probed_rows,
  takes_keyword,
  takes_step_options,
  uses_base_initialize_carry,
)
from nnx_recurrent._scan._core import (  # noqa: F401 -- the engine's names
  masked_scan,
  segment_start,
)
from nnx_recurrent._scan._layout import (  # noqa: F401 -- the engine's names
  Sequence,
  output_order,
  prepare,
  processing_order,
  restore_layout,
  reverse_indices,
  take_time,
)
from nnx_recurrent._scan._masking import (  # noqa: F401 -- the engine's names
  Rows,
  StepMasks,
  clean_padding,
  earlier_valid,
  masked_where,
  select,
)
from nnx_recurrent._scan._sharding import (  # noqa: F401 -- the engine's names
  EXPLICIT_REMEDY,
  abstract_step_input,
  check_gate_split,
  explicit_mesh,
  explicit_spec,
  gates_checked,
  like_inputs,
  scan_unroll,
  settle_carry,
  splits_rows,
  typed_as,
  vary_like,
  varying_axes,
)
from nnx_recurrent._scan._steps import (  # noqa: F401 -- the engine's names
  held_dtype,
  in_dtypes_of,
  keep_at_padding,
  linen_step,
  plain_step,
  step,
  with_rows,
)
