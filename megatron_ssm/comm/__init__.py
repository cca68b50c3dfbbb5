"""Pluggable all-reduce for row-parallel outputs: exact, block-quantised (int8/fp8/fp16) or auto."""
from .allreduce import (
    ALLREDUCE_CHOICES,
    AllReduce,
    AutoAllReduce,
    ExactAllReduce,
    PendingAllReduce,
    QuantizedAllReduce,
    calibrate,
    make_allreduce,
)
from .oneshot import OneShotAllReduce
from .quantize import dequantize_blocks, quantize_blocks

__all__ = [
    "ALLREDUCE_CHOICES",
    "AllReduce",
    "AutoAllReduce",
    "ExactAllReduce",
    "OneShotAllReduce",
    "PendingAllReduce",
    "QuantizedAllReduce",
    "calibrate",
    "dequantize_blocks",
    "make_allreduce",
    "quantize_blocks",
]
