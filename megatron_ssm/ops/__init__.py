"""Torch reference ops for the selective-SSM mixers.

These define the numbers: they run anywhere (CPU included) and every GPU kernel behind the same
signature is tested against them. All take sequence-major activations ([batch, seqlen, channels])
and carry state in float32.
"""
from .attention import decode_attention, packed_causal_attention
from .conv1d import causal_conv1d, causal_conv1d_update
from .decode import mamba1_decode_step, mamba2_decode_step, mamba2_step_into_entry
from .linear import RowRms, linear
from .norm import EntryParts, add_rms_norm, add_rms_norm_linear, gated_rms_norm, linear_into_entry, rms_norm
from .reduce import row_max
from .rope import rotary_embedding
from .selective_scan import selective_scan, selective_state_update
from .ssd import ssd_chunk_scan, ssd_state_update

__all__ = [
    "add_rms_norm", "add_rms_norm_linear", "linear_into_entry", "causal_conv1d", "causal_conv1d_update", "gated_rms_norm", "linear", "rms_norm",
    "selective_scan", "selective_state_update", "ssd_chunk_scan", "ssd_state_update",
    "mamba1_decode_step", "mamba2_decode_step", "mamba2_step_into_entry", "packed_causal_attention", "rotary_embedding",
    "decode_attention", "row_max",
]
