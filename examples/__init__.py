"""Runnable examples for nnx_recurrent (``python -m examples.<name>``)."""
