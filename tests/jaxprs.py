"""Reading a traced program: every equation of a jaxpr, nested ones included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def equations(jaxpr: Any) -> Iterator[Any]:
  """Each equation of ``jaxpr`` (a ``Jaxpr``) in program order, each followed by
  those of the programs in its parameters (a scan's body, a cond's branches, a
  ``custom_vjp``'s function, a jit's program...), depth first."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's jaxpr, or a Jaxpr
        if hasattr(inner, 'eqns'):
          yield from equations(inner)
