"""Interoperability with other frameworks.

:func:`from_torch` and :func:`to_torch` convert between PyTorch's recurrent
modules and this library's. PyTorch is an optional dependency: importing this
package does not import it; the functions import it when called.
"""

from nnx_recurrent.interop.torch import from_torch as from_torch
from nnx_recurrent.interop.torch import to_torch as to_torch

__all__ = ['from_torch', 'to_torch']
