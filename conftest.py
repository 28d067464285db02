"""Test-session settings shared by every test and doctest (tests/, compat/, docs/, the package)."""

import os

# The tests compile many tiny programs; XLA:CPU's optimising backend passes
# dominate their run time (seconds per scan on 2 cores) and buy nothing at
# these sizes. Must be set before the first computation; a user's own setting
# of the level wins.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '')
    + ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
  ).strip()

import jax  # noqa: E402

# Implicit rank promotion hides broadcasting bugs (a (batch,) mask against a
# (batch, features) array...); make it an error everywhere in the suite.
jax.config.update('jax_numpy_rank_promotion', 'raise')
