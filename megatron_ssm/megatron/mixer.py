"""Our tensor-parallel mixers behind megatron-core's `MambaLayer` mixer contract.

`MambaLayer` builds its mixer as `build_module(spec, config, d_model=..., layer_number=...,
pg_collection=..., pp_layer_offset=...)` (0.19 adds `name=`), calls it as
`mixer(hidden [s, b, h], inference_context=..., packed_seq_params=...)` and adds the returned
`(out, bias)` to the residual. These classes ARE our mixers (`model/mamba2.py`, `model/mamba1.py`:
the same modules MambaLM runs), built from megatron-core's TransformerConfig, with that forward and
a `sharded_state_dict` in megatron-core's layout, so parameter names and torch_dist files are the
ones megatron-core's own MambaMixer uses (in_proj split z/x/B/C/dt, conv1d x/B/C).

Beyond megatron-core: Mamba-2 with n_groups < tp (B/C of a group replicated on the ranks of its heads,
the norm's statistics all-reduced), and Mamba-1 / Falcon-Mamba (split by channel).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import FALCON_MAMBA, MAMBA1, MAMBA2, SSMConfig
from ..model.layers import mark_tensor_parallel
from ..model.mamba1 import Mamba1Mixer
from ..model.mamba2 import Mamba2Mixer
from ..parallel import TPContext


def _tp_context(pg_collection, device: torch.device) -> TPContext:
    from megatron.core import parallel_state

    group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
    group = group or parallel_state.get_tensor_model_parallel_group()
    import torch.distributed as dist

    size = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    return TPContext(group=group, rank=rank, size=size, device=device)


def ssm_config(config, d_model: int, family: str, **overrides) -> SSMConfig:
    """Our one-layer model description from megatron-core's TransformerConfig (mamba_* fields)."""
    state = config.mamba_state_dim
    if family == MAMBA2:
        head_dim = config.mamba_head_dim
        heads = config.mamba_num_heads or 2 * d_model // head_dim  # MambaMixer's expand=2
        fields = dict(num_heads=heads, head_dim=head_dim, n_groups=config.mamba_num_groups, chunk_size=128,
                      intermediate_size=heads * head_dim)
    else:
        fields = dict(intermediate_size=2 * d_model, time_step_rank=math.ceil(d_model / 16),
                      mixer_rms_eps=1e-6 if family == FALCON_MAMBA else None)
    # megatron-core's MambaMixer fixes its gated norm's eps at 1e-5; no biases on the projections.
    fields = dict(family=family, hidden_size=d_model, num_layers=1, vocab_size=1, state_size=state, norm_eps=1e-5,
                  use_bias=False, use_conv_bias=True, **fields)
    fields.update(overrides)
    return SSMConfig(**fields)


class _MegatronContract:
    """The MambaLayer-facing half shared by both families (mixed into our mixer classes)."""

    def _setup_contract(self, config, layer_number, pp_layer_offset) -> None:
        self.config = config
        self.layer_number = layer_number
        self.pp_layer_offset = pp_layer_offset
        self.chunk_size = self.cfg.chunk_size
        self.cached_batch_size = None
        # Trainable, with the attributes megatron-core's optimizer, grad clipping and DDP read.
        self.requires_grad_(True)
        for name, p in self.named_parameters():
            if not getattr(p, "tensor_model_parallel", False):
                mark_tensor_parallel(p, dim=0)
        if config.perform_initialization:
            self._initialize(config)

    @torch.no_grad()
    def _initialize(self, config) -> None:
        """MambaMixer's initialisation (a model trained from scratch; checkpoints overwrite it)."""
        config.init_method(self.in_proj.weight)
        config.output_layer_init_method(self.out_proj.weight)
        nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            self.conv1d.bias.zero_()
        A = torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16)
        if self.A_log.dim() == 2:  # Mamba-1: A_n = n for every channel (S4D-real)
            A = torch.arange(1, self.A_log.shape[1] + 1, dtype=torch.float32).expand_as(self.A_log)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.A_log.shape[0]) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        inv_dt = (dt + torch.log(-torch.expm1(-dt.clamp(min=1e-4)))).to(self.D.dtype)
        if hasattr(self, "dt_bias"):
            self.dt_bias.copy_(inv_dt)
            self.norm.weight.fill_(1.0)
        else:
            config.init_method(self.x_proj.weight)
            nn.init.uniform_(self.dt_proj.weight, -self.cfg.time_step_rank ** -0.5, self.cfg.time_step_rank ** -0.5)
            self.dt_proj.bias.copy_(inv_dt)

    def mamba_state_shapes_per_request(self):
        """(conv state, SSM state) shapes of one sequence on this rank. Our conv state holds the
        K-1 inputs before the current one (megatron-core's holds K)."""
        return self.state_shapes()

    def _states(self, inference_context, batch: int):
        """Static-batching states kept in the context under this layer's number, as MambaMixer keeps them."""
        memory = inference_context.key_value_memory_dict
        if self.layer_number not in memory or batch != self.cached_batch_size:
            conv_shape, ssm_shape = self.state_shapes()
            w = self.in_proj.weight
            memory[self.layer_number] = (torch.zeros(batch, *conv_shape, dtype=w.dtype, device=w.device),
                                         torch.zeros(batch, *ssm_shape, dtype=torch.float32, device=w.device))
            self.cached_batch_size = batch
        conv, ssm = memory[self.layer_number]
        if inference_context.sequence_len_offset == 0:
            conv.zero_()
            ssm.zero_()
        return conv, ssm

    def forward(self, hidden_states: torch.Tensor, inference_context=None, *, inference_params=None,
                packed_seq_params=None, **unused):
        """hidden_states [s, b, h] -> (out [s, b, h], None): MambaMixer's contract."""
        inference_context = inference_context if inference_context is not None else inference_params
        if packed_seq_params is not None:
            raise NotImplementedError("megatron_ssm mixers do not take packed sequences (packed_seq_params)")
        if inference_context is not None and not inference_context.is_static_batching():
            raise NotImplementedError("megatron_ssm mixers run megatron-core's static-batching inference only; "
                                      "for serving use megatron_ssm's engine (examples/run_text_generation_server.py)")
        x = hidden_states.transpose(0, 1)
        states = () if inference_context is None or self.training else self._states(inference_context, x.shape[0])
        out = self.start(x, *states).wait()
        return out.transpose(0, 1).contiguous(), None

    # ---- distributed checkpointing -----------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron-core's layout for torch_dist: every local tensor split along dim 0, linears by
        their own rules, and the packed in_proj / conv1d split into their segments so files
        reshard across TP degrees (and interoperate with megatron-core's own MambaMixer)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint, sharded_state_dict_default

        try:
            from megatron.core.ssm.utils import _split_tensor_factory  # 0.19
        except ImportError:
            from megatron.core.ssm.mamba_mixer import _split_tensor_factory  # 0.16

        local = {}
        self._save_to_state_dict(local, "", keep_vars=True)
        axis = {k: 0 for k in local}
        sharded = make_sharded_tensors_for_checkpoint(local, prefix, axis, sharded_offsets, tp_group=self.tp.group,
                                                      dp_cp_group=(metadata or {}).get("dp_cp_group"))
        for name, module in self.named_children():
            if name in ("in_proj", "out_proj", "x_proj"):
                sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                          tp_group=self.tp.group))
            else:
                sd = {}
                module._save_to_state_dict(sd, "", keep_vars=True)
                sharded.update(make_sharded_tensors_for_checkpoint(
                    sd, f"{prefix}{name}.", {k: 0 for k in sd}, sharded_offsets, tp_group=self.tp.group,
                    dp_cp_group=(metadata or {}).get("dp_cp_group")))
        for key, (sizes, names) in self._packed_segments().items():
            full = f"{prefix}{key}"
            if full in sharded:
                sharded[full] = _split_tensor_factory(sharded[full], sizes, names, 0)
        return sharded


class Mamba2SpecMixer(_MegatronContract, Mamba2Mixer):
    """Mamba-2 (our Mamba2Mixer) as a megatron-core MambaLayer mixer."""

    def __init__(self, config, submodules=None, d_model: int | None = None, layer_number: int | None = None,
                 pg_collection=None, pp_layer_offset: int = 0, name: str | None = None, **overrides):
        device = torch.device("cpu") if config.use_cpu_initialization or not torch.cuda.is_available() \
            else torch.device("cuda", torch.cuda.current_device())
        cfg = ssm_config(config, d_model or config.hidden_size, MAMBA2, **overrides)
        tp = _tp_context(pg_collection, device)
        Mamba2Mixer.__init__(self, cfg, tp, config, dtype=config.params_dtype, device=device)
        self._setup_contract(config, layer_number, pp_layer_offset)
        if self.shared_group is not None:
            # B/C rows (in_proj, conv1d) are one group's copy on every rank of its heads: their true
            # gradient is the sum of the copies' gradients.
            c, bc = self.channels, self.bc_width
            self.in_proj.weight.register_hook(lambda g: self._sum_replicas(g, 2 * c, 2 * c + 2 * bc))
            self.conv1d.weight.register_hook(lambda g: self._sum_replicas(g, c, c + 2 * bc))
            if self.conv1d.bias is not None:
                self.conv1d.bias.register_hook(lambda g: self._sum_replicas(g, c, c + 2 * bc))

    def _sum_replicas(self, grad: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        import torch.distributed as dist

        part = grad[start:stop]
        slots = part.new_zeros(self.cfg.n_groups, *part.shape)
        slots[self.shared_group] = part
        dist.all_reduce(slots, group=self.tp.group)
        grad = grad.clone()
        grad[start:stop] = slots[self.shared_group]
        return grad

    def _packed_segments(self):
        if self.shared_group is not None:
            return {}  # B/C replicated across ranks: sharded_state_dict refuses below
        c, bc, h = self.channels, self.bc_width, self.heads
        return {"in_proj.weight": ([c, c, bc, bc, h], ["z", "x", "B", "C", "dt"]),
                "conv1d.weight": ([c, bc, bc], ["x", "B", "C"]), "conv1d.bias": ([c, bc, bc], ["x", "B", "C"])}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        if self.shared_group is not None:
            raise NotImplementedError(
                f"n_groups {self.cfg.n_groups} < tp {self.tp.size}: megatron-core's torch_dist layout cannot hold "
                f"replicated B/C groups; save with tools/convert_hf.py (our format) or at a TP dividing n_groups")
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # megatron-core 0.19 names conv1d's parameters conv1d_weight / conv1d_bias in legacy files
        for ours, theirs in (("conv1d.weight", "conv1d_weight"), ("conv1d.bias", "conv1d_bias")):
            if prefix + theirs in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Mamba1SpecMixer(_MegatronContract, Mamba1Mixer):
    """Mamba-1 / Falcon-Mamba (our Mamba1Mixer, split by channel) as a MambaLayer mixer; megatron-core
    has none. `family="falcon_mamba"` adds Falcon-Mamba's weightless dt/B/C norms."""

    def __init__(self, config, submodules=None, d_model: int | None = None, layer_number: int | None = None,
                 pg_collection=None, pp_layer_offset: int = 0, name: str | None = None, family: str = MAMBA1,
                 **overrides):
        device = torch.device("cpu") if config.use_cpu_initialization or not torch.cuda.is_available() \
            else torch.device("cuda", torch.cuda.current_device())
        cfg = ssm_config(config, d_model or config.hidden_size, family, **overrides)
        tp = _tp_context(pg_collection, device)
        Mamba1Mixer.__init__(self, cfg, tp, config, dtype=config.params_dtype, device=device)
        self.tp = tp
        self._setup_contract(config, layer_number, pp_layer_offset)

    def _packed_segments(self):
        d = self.channels
        return {"in_proj.weight": ([d, d], ["x", "z"])}
