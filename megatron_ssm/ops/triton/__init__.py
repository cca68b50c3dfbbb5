"""Triton kernels behind the reference ops' signatures (see `megatron_ssm.ops` for the semantics).

Importing this package imports triton; `megatron_ssm.ops.dispatch` imports it lazily, so the rest of
the project runs where triton is absent. The kernels accept any strides the model produces (views
from splitting packed projections) and keep states in fp32 as the references do.
"""
from .attention import decode_attention
from .conv1d import causal_conv1d, causal_conv1d_update
from .decode import mamba2_decode_step, mamba2_step_into_entry
from .gemv import add_rms_norm_linear, linear, linear_into_entry
from .norm import add_rms_norm, gated_rms_norm, rms_norm
from .reduce import row_max
from .rope import rotary_embedding
from .scan import mamba1_decode_step, selective_scan, selective_state_update, ssd_chunk_scan, ssd_state_update

__all__ = [
    "add_rms_norm", "add_rms_norm_linear", "linear_into_entry", "causal_conv1d", "causal_conv1d_update", "gated_rms_norm", "linear", "rms_norm",
    "selective_scan", "selective_state_update", "ssd_chunk_scan", "ssd_state_update",
    "mamba1_decode_step", "mamba2_decode_step", "mamba2_step_into_entry", "rotary_embedding", "decode_attention", "row_max",
]
