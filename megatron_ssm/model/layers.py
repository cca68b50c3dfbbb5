"""Megatron-core's parallel layers with an inference forward and one pluggable reduction.

megatron-core lays the weights out (shapes per rank, partition attributes, sharded state dicts); we
keep its modules but run a plain linear forward (`project`: F.linear, or our skinny-GEMM kernel
for decode-sized inputs when no backward will run): no async-grad paths, and every row-parallel
output reduced through the one `AllReduce` chosen at construction.

When gradients flow (`differentiable(param)`: grad mode on and the weights trainable, as in
Megatron's training loop through `megatron_ssm.megatron`), the collectives become megatron-core's
differentiable mappings instead: a column-parallel input is copied into the TP region (its gradient
all-reduced), a row-parallel output reduced with an identity backward when what follows is
replicated, and with an all-reduced backward (`all_reduce_with_grad`) when each rank goes on with its
own channels (Mamba-1's x_proj output, Mamba-2's norm statistics across ranks).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import tensor_parallel

from ..comm import AllReduce, ExactAllReduce, PendingAllReduce
from ..ops.dispatch import (add_rms_norm, add_rms_norm_linear, causal_conv1d, causal_conv1d_update, exit_rows, linear,
                            linear_into_entry)
from ..ops.linear import Factors, linear as reference_linear
from ..ops.norm import EntryParts
from ..parallel import TPContext

AllReduceFn = AllReduce  # anything called as allreduce(tensor, group) -> reduced tensor


def _no_init(weight: torch.Tensor) -> None:
    """Weights come from checkpoints: nothing to initialise."""


def differentiable(param: torch.Tensor) -> bool:
    """True while a backward will run through this layer (training), so collectives must have one."""
    return torch.is_grad_enabled() and param.requires_grad


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            scale: float | torch.Tensor | Factors | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(x @ weight^T * row_scale + bias) * scale (ops/linear.py). The dispatch layer's kernel has no
    backward, so while one may run (grad mode on and either side requiring grad) this is the reference."""
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return reference_linear(x, weight, bias, scale, row_scale)
    return linear(x, weight, bias, scale, row_scale)


def project_entry(stream: torch.Tensor, delta: torch.Tensor | None, norm: "RMSNorm", residual_dtype: torch.dtype,
                  weight: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: float | torch.Tensor | Factors | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(project(normed), stream + delta) for a pre-norm block's entry (ops' add_rms_norm) and the
    projection that reads it, as one op (one kernel at decode); None while gradients may flow,
    where the block's own entry and the layer's forward keep their differentiable paths. A delta
    still unprojected (DeferredOutput) is projected with the entry in its epilogue, and this
    projection applies the norm's 1/rms after its product: the entry then has no kernel of its own."""
    if isinstance(delta, DeferredOutput):
        entry = delta.into_entry(stream, norm, residual_dtype)
        return project(entry.scaled, weight, bias, scale, row_scale=entry.row_rms), entry.stream
    if torch.is_grad_enabled() and (weight.requires_grad or norm.weight.requires_grad or stream.requires_grad
                                    or (delta is not None and delta.requires_grad)):
        return None
    return add_rms_norm_linear(stream, delta, norm.weight, norm.eps, residual_dtype, weight, bias, scale)


def all_reduce_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the TP group whose backward sums the gradients too: for a sum that every rank then
    uses differently (on its own channels), each rank's gradient is one part of the total."""
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(x, group=group)


def mark_tensor_parallel(param: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The attributes megatron-core's optimizer and grad clipping read on a parameter split over TP."""
    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    return param


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """Output features split across ranks; input replicated. Returns this rank's slice."""

    def __init__(self, input_size: int, output_size: int, *, config, bias: bool):
        super().__init__(input_size, output_size, config=config, init_method=_no_init, bias=bias,
                         gather_output=False, skip_bias_add=False)

    def forward(self, x: torch.Tensor, scale: float | torch.Tensor | Factors | None = None) -> torch.Tensor:  # type: ignore[override]
        """scale: this rank's output features' factors (or one float), applied after the bias."""
        if differentiable(self.weight) and self.tp_size > 1:  # checked per call: cheap test first
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        return project(x, self.weight, self.bias, scale)

    @property
    def tp_size(self) -> int:
        return self.tp_group.size() if getattr(self, "tp_group", None) is not None else 1


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """Input features split across ranks; partial outputs summed by `allreduce` over the TP group."""

    def __init__(self, input_size: int, output_size: int, *, config, bias: bool, tp: TPContext,
                 allreduce: AllReduceFn | None = None, replicated_output: bool = True):
        """replicated_output: what follows runs the same on every rank (out_proj); False when each
        rank uses the sum on its own channels (Mamba-1's x_proj), which changes only the backward."""
        super().__init__(input_size, output_size, config=config, init_method=_no_init, bias=bias,
                         input_is_parallel=True, skip_bias_add=False)
        self.tp = tp
        self.allreduce = allreduce or ExactAllReduce()
        self.replicated_output = replicated_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = project(x, self.weight)
        if self.tp.size > 1:
            y = self._reduce_with_grad(y) if differentiable(self.weight) else self.allreduce(y, self.tp.group)
        return y if self.bias is None else y + self.bias

    def _reduce_with_grad(self, y: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return y
        if self.replicated_output:
            return tensor_parallel.reduce_from_tensor_model_parallel_region(y, group=self.tp.group)
        return all_reduce_with_grad(y, self.tp.group)

    def start(self, x: torch.Tensor, scale: float = 1.0, row_scale: torch.Tensor | None = None) -> PendingOutput:
        """forward times `scale`, returning before the reduction completes (see PendingOutput). The
        reduction runs on the TP group's second communicator, so the synchronous collectives that
        the next micro-chunk issues on the first one do not queue behind it. Without a bias the
        scale goes into the projection (a sum of scaled parts is the scaled sum). row_scale (fp32,
        x.shape[:-1]) multiplies each row of this rank's part before the reduction: the same on
        every rank, it too commutes with the sum."""
        lazy = isinstance(x, LazyInput)
        if (self.tp.size == 1 and self.bias is None and not differentiable(self.weight)
                and (x.rows if lazy else x.numel() // x.shape[-1]) <= exit_rows()):
            return DeferredOutput(x, self.weight, None if scale == 1.0 else scale, row_scale)
        if lazy:
            x, row_scale = x.materialize()
        if self.bias is None and scale != 1.0:
            y, scale = project(x, self.weight, scale=scale, row_scale=row_scale), 1.0
        else:
            y = project(x, self.weight, row_scale=row_scale)
        if differentiable(self.weight):  # training: the differentiable reduction, nothing left in flight
            return PendingOutput(PendingAllReduce(self._reduce_with_grad(y)), self.bias, scale)
        group = self.tp.overlap_group or self.tp.group
        pending = self.allreduce.start(y, group) if self.tp.size > 1 else PendingAllReduce(y)
        return PendingOutput(pending, self.bias, scale)


class PendingOutput:
    """A row-parallel output whose all-reduce is in flight; `wait()` returns the finished output
    (plus bias, times `scale`: the multipliers some families put on a layer's output)."""

    def __init__(self, pending: PendingAllReduce, bias: torch.Tensor | None, scale: float = 1.0):
        self.pending, self.bias, self.scale = pending, bias, scale

    def wait(self) -> torch.Tensor:
        y = self.pending.wait()
        y = y if self.bias is None else y + self.bias
        return y if self.scale == 1.0 else y * self.scale


class LazyInput:
    """A row-parallel projection's input not computed yet: `materialize()` computes it (and the
    factor per row the projection applies after its product, or None), `into_entry(weight, scale,
    stream, norm, residual_dtype)` computes it together with the projection and the next block's
    entry (ops.norm.EntryParts), in one kernel where there is one. A mixer hands one to
    RowParallelLinear.start, so that its step runs where the output is consumed (Mamba-2's decode
    step inside out_proj's launch). Either runs the op once, and only one of them may be called."""

    def __init__(self, rows: int, materialize, into_entry):
        self.rows, self._materialize, self._into_entry = rows, materialize, into_entry

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._materialize()

    def into_entry(self, weight, scale, stream, norm, residual_dtype):
        return self._into_entry(weight, scale, stream, norm, residual_dtype)


class DeferredOutput:
    """A row-parallel output at TP 1 not projected yet (few rows: a decode step), so that the next
    block's entry can run in the projection's epilogue (`into_entry`: the residual add, the norm's
    weight and sums of squares; ops.norm.linear_into_entry), saving the entry's own kernel. `wait()`
    projects it as RowParallelLinear.start would have, for any other consumer. x may be a LazyInput:
    `into_entry` then runs its op with the projection and the entry, `wait()` computes it first."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, scale: float | None, row_scale: torch.Tensor | None):
        self.x, self.weight, self.scale, self.row_scale = x, weight, scale, row_scale
        self._out: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._out is None:
            self._inputs()
            self._out = project(self.x, self.weight, scale=self.scale, row_scale=self.row_scale)
        return self._out

    def _inputs(self) -> None:
        if isinstance(self.x, LazyInput):
            self.x, self.row_scale = self.x.materialize()
        assert self.x is not None, "a lazy input already consumed by into_entry"

    def into_entry(self, stream: torch.Tensor, norm: "RMSNorm", residual_dtype: torch.dtype):
        """ops.norm.EntryParts of norm(stream + this output), the output never materialised."""
        if self._out is not None:  # already projected for someone else: a plain entry
            normed, h = add_rms_norm(stream, self._out, norm.weight, norm.eps, residual_dtype)
            return EntryParts(normed, h, None)
        if isinstance(self.x, LazyInput):
            lazy, self.x = self.x, None
            return lazy.into_entry(self.weight, self.scale, stream, norm, residual_dtype)
        return linear_into_entry(self.x, self.weight, self.row_scale, stream, norm.weight, norm.eps, residual_dtype,
                                 self.scale)


class SummedOutput:
    """Several pending outputs added together (a block whose mixers run side by side)."""

    def __init__(self, *parts: PendingOutput):
        self.parts = parts

    def wait(self) -> torch.Tensor:
        out = self.parts[0].wait()
        for p in self.parts[1:]:
            out = out + p.wait()
        return out


class VocabParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    """Rows of the (padded) vocabulary split across ranks; each rank embeds the ids it owns and an
    all-reduce fills in the rest. Masking by `masked_fill` keeps the forward free of host syncs, so
    it can be captured in a CUDA graph."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, config, tp: TPContext,
                 allreduce: AllReduceFn | None = None):
        super().__init__(num_embeddings, embedding_dim, init_method=_no_init, config=config)
        self.tp = tp
        self.allreduce = allreduce or ExactAllReduce()  # must be exact: rows are summed with zeros

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start_index
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.allreduce(out, self.tp.group)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over this rank's channels; weight stored as HF stores it, [C, 1, K]."""

    def __init__(self, channels: int, kernel: int, bias: bool, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(channels, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def forward(self, x: torch.Tensor, state: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, L, C]. `state` [b, C, K-1] holds the inputs before x and is advanced in place;
        None starts from zeros and keeps nothing. With cu_seqlens, x [1, T, C] packs sequences that
        each start from zeros, and `state` [nseq, C, K-1] receives each one's final state."""
        w = self.weight.squeeze(1)
        if state is not None and x.shape[1] == 1 and cu_seqlens is None:
            return causal_conv1d_update(x[:, 0], state, w, self.bias).unsqueeze(1)
        packed = cu_seqlens is not None
        y, final = causal_conv1d(x, w, self.bias, initial_state=None if packed else state, cu_seqlens=cu_seqlens)
        if state is not None:
            state.copy_(final)
        return y


def fold_input_scale(input_scale: float, has_bias: bool) -> tuple[float, float]:
    """A multiplier on a projection's input as (what still multiplies the input, what moves to the
    output): all of it moves where the projection has no bias (W(sx) = s(Wx)), none where it has."""
    return (input_scale, 1.0) if has_bias else (1.0, input_scale)


class OutputFactors(nn.Module):
    """A projection's output factors (a family's multipliers, for its `scale`) for an output made of
    segments of `widths`, segment i times factors[i]: the per-feature tensor is a buffer, so it moves
    with the model; `scale` pairs it with the runs it is made of (ops/linear.py's Factors), or is
    None when every factor is 1."""

    def __init__(self, widths, factors, device):
        super().__init__()
        ends = itertools.accumulate(widths)
        self.segments = tuple((end - w, end, float(f)) for w, end, f in zip(widths, ends, factors) if f != 1.0 and w)
        per_feature = (torch.cat([torch.full((w,), float(f)) for w, f in zip(widths, factors)]).to(device)
                       if self.segments else None)
        self.register_buffer("per_feature", per_feature, persistent=False)

    @property
    def scale(self) -> Factors | None:
        return None if self.per_feature is None else Factors(self.per_feature, self.segments)


def local_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Mixer(nn.Module):
    """A mixer whose output ends in a row-parallel all-reduce. Subclasses define `start`, which
    returns while that all-reduce is in flight (so prefill can overlap it). hidden [b, L, hidden];
    states (if given) hold the context before `hidden` and are advanced in place; L == 1 with
    states takes the single-step path. With cu_seqlens (ops/varlen.py), hidden [1, T, hidden] packs
    sequences that each start from zero states; the states [nseq, ...] then receive each sequence's
    final state (what they held before is not read). cp (a ContextParallelSpans): hidden is this
    rank's span of a range split over the context-parallel group."""

    def start(self, hidden: torch.Tensor, conv_state: torch.Tensor | None = None,
              ssm_state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
              cp=None) -> PendingOutput:
        raise NotImplementedError

    def project_entry(self, stream: torch.Tensor, delta: torch.Tensor | None, norm: "RMSNorm",
                      residual_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the first projection of norm(stream + delta), stream + delta) in one op, for `start`'s
        `projected`; None where this mixer does not take it (the block then runs its entry alone)."""
        return None


def decay_rates(mixer: nn.Module) -> torch.Tensor:
    """A = -exp(A_log) in fp32, kept until A_log changes (its in-place version counter moves, as a
    checkpoint load's copy_ does): recomputing it costs three kernel launches a layer a decode step."""
    if differentiable(mixer.A_log):  # training: part of this forward's graph, never cached
        return -torch.exp(mixer.A_log.float())
    version = mixer.A_log._version
    if getattr(mixer, "_decay_version", None) != version or mixer._decay.device != mixer.A_log.device:
        mixer._decay = -torch.exp(mixer.A_log.float())
        mixer._decay_version = version
    return mixer._decay
