"""compat's GRUCell / MGUCell training step against flax.linen's (CPU or GPU).

Usage (``PYTHONPATH`` at the commit to measure; LABEL only names the printout)::

  python -m benchmarks.compat_speed LABEL

For each cell and shape ``(B, T, I, H)``: the jitted ``jax.value_and_grad`` of
``mean(RNN(cell).apply(variables, x) ** 2)`` with the same flax.linen
variables, both modules timed in 7 interleaved rounds; the medians in ms and
their ratio. benchmarks/HISTORY.md ("Session 40") has the numbers.
"""

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nnx_recurrent import compat

SHAPES = ((8, 500, 64, 128), (64, 100, 128, 256))


def main(label: str = '') -> None:
  for cell in ('GRUCell', 'MGUCell'):
    for b, t, i, h in SHAPES:
      x = jnp.asarray(np.random.default_rng(0).normal(size=(b, t, i)).astype(np.float32))
      variables = nn.RNN(getattr(nn, cell)(h)).init(jax.random.key(0), x[:, :2])
      steps = {}
      for name, lib in (('compat', compat), ('linen', nn)):
        rnn = lib.RNN(getattr(lib, cell)(h))
        steps[name] = jax.jit(jax.value_and_grad(
          lambda v, x, rnn=rnn: jnp.mean(rnn.apply(v, x) ** 2)))
        jax.block_until_ready(steps[name](variables, x))
      times: dict[str, list[float]] = {name: [] for name in steps}
      names = list(steps)
      for r in range(7):
        for name in names[r % 2:] + names[:r % 2]:
          start = time.perf_counter()
          jax.block_until_ready(steps[name](variables, x))
          times[name].append(time.perf_counter() - start)
      ms = {name: float(np.median(ts)) * 1e3 for name, ts in times.items()}
      print(label, cell, (b, t, i, h), {k: round(v, 1) for k, v in ms.items()},
            'ratio', round(ms['compat'] / ms['linen'], 3), flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:2])
