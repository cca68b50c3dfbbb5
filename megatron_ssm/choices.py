"""Command-line choices shared by the entry points (examples/generate.py, the server)."""
from .comm.allreduce import ALLREDUCE_CHOICES

DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # the keys of checkpoint.convert.DTYPES

__all__ = ["ALLREDUCE_CHOICES", "DTYPE_CHOICES"]
