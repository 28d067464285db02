"""The layers that stream, run in chunks with their carries passed on, against
step loops over each whole sequence (see :func:`fuzz.layers_family.stream_case`)."""

from fuzz.layers_family import stream_case as run

__all__ = ['run']
