"""One description of a model, read from a HuggingFace `config.json`.

Pure SSMs: Mamba-1 (`MambaForCausalLM`), Falcon-Mamba (Mamba-1 plus weightless RMS norms on dt, B and
C) and Mamba-2 (`Mamba2ForCausalLM`: heads, groups, chunked scan, gated RMSNorm). Hybrids add attention
and MLP layers: Nemotron-H (`NemotronHForCausalLM`) and Falcon-H1 (`FalconH1ForCausalLM`).

Every model is a stack of pre-norm residual blocks described by `pattern`, one letter per block, in
megatron-core's letters: `M` Mamba mixer, `*` attention, `-` MLP (`E`, MoE, is refused), plus `P`: a
Mamba-2 mixer and attention side by side on one norm's output, their outputs summed (Falcon-H1's
"parallel hybrid"). A pure Mamba model is `MMMM...`. How a family maps onto the stack: docs/hybrids.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAMBA1, FALCON_MAMBA, MAMBA2 = "mamba", "falcon_mamba", "mamba2"
NEMOTRON_H, FALCON_H1 = "nemotron_h", "falcon_h1"
ZAMBA, ZAMBA2 = "zamba", "zamba2"
# family -> (HF architecture, HF model_type): the one table readers and writers use
FAMILIES = {
    MAMBA1: ("MambaForCausalLM", "mamba"),
    FALCON_MAMBA: ("FalconMambaForCausalLM", "falcon_mamba"),
    MAMBA2: ("Mamba2ForCausalLM", "mamba2"),
    NEMOTRON_H: ("NemotronHForCausalLM", "nemotron_h"),
    FALCON_H1: ("FalconH1ForCausalLM", "falcon_h1"),
    ZAMBA: ("ZambaForCausalLM", "zamba"),
    ZAMBA2: ("Zamba2ForCausalLM", "zamba2"),
}
MAMBA2_MIXER_FAMILIES = (MAMBA2, NEMOTRON_H, FALCON_H1, ZAMBA2)

# Block kinds of a pattern (megatron-core's letters, plus P for Falcon-H1's parallel block)
MAMBA_BLOCK, ATTENTION_BLOCK, MLP_BLOCK, MOE_BLOCK, PARALLEL_BLOCK = "M", "*", "-", "E", "P"
# S: a Mamba block whose norm input also takes one application of a shared attention + MLP block
# (Zamba, Zamba2: model/zamba.py); the shared blocks' weights are held once, not per position
SHARED_BLOCK = "S"
BLOCK_KINDS = (MAMBA_BLOCK, ATTENTION_BLOCK, MLP_BLOCK, PARALLEL_BLOCK, SHARED_BLOCK)
# blocks holding a Mamba mixer / an attention
MIXER_BLOCKS = (MAMBA_BLOCK, PARALLEL_BLOCK, SHARED_BLOCK)
ATTENTION_BLOCKS = (ATTENTION_BLOCK, PARALLEL_BLOCK, SHARED_BLOCK)
RELU2, SWIGLU, GEGLU = "relu2", "swiglu", "geglu"  # GEGLU: up * gelu(gate), exact (erf) gelu


class ConfigError(ValueError):
    """A model description that cannot be built, or cannot be split over the asked TP degree."""


@dataclass
class SSMConfig:
    family: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int
    state_size: int
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = True
    # Mamba-1 / Falcon-Mamba
    time_step_rank: int = 0
    mixer_rms_eps: float | None = None  # set for Falcon-Mamba only
    # Mamba-2
    num_heads: int = 0
    head_dim: int = 0
    n_groups: int = 1
    chunk_size: int = 256
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    # token ids (generation stops on eos)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict)
    # ---- the stack: one letter per block (see the module docstring); "" means all Mamba
    pattern: str = ""
    # Mamba-2 variants: out_proj's bias (None: use_bias); "gated" RMSNorm after the gate or "none"
    # (y * silu(z), Falcon-H1 without mamba_rms_norm)
    mamba_out_bias: bool | None = None
    mamba_norm: str = "gated"
    # ---- attention (blocks * and P)
    num_attention_heads: int = 0
    num_kv_heads: int = 0
    attention_head_dim: int = 0
    attention_bias: bool = False  # q, k, v and o projections
    rope_theta: float | None = None  # None: no rotary embedding (Nemotron-H)
    rotary_dim: int = 0  # leading channels of each head that rotate; 0: all of them
    # ---- MLP (blocks -)
    mlp_kind: str = ""  # RELU2 (up, squared ReLU, down) or SWIGLU (up * silu(gate), down)
    mlp_intermediate_size: int = 0
    mlp_bias: bool = False
    # ---- scalar multipliers (Falcon-H1's muP; 1.0 when absent): embedding, lm_head, attention_in,
    # attention_out, key, ssm_in, ssm_out, mlp_gate, mlp_down
    multipliers: dict = field(default_factory=dict)
    # per-segment multipliers of Mamba-2's in_proj output [z, x, B, C, dt] (Falcon-H1's mup vector)
    ssm_multipliers: tuple = ()
    # ---- Zamba's shared blocks (pattern letter S; num_heads then counts Zamba's Mamba-1 "mamba heads")
    shared_blocks: int = 0  # shared attention + MLP blocks; the k-th S uses block k % shared_blocks
    adapter_rank: int = 0  # Zamba2's per-use LoRA on the MLP's gate/up rows (0: none)
    attention_adapters: bool = False  # ... and on q, k, v (same rank)
    attention_input_size: int = 0  # the attention's input width (0: hidden_size; Zamba: 2 x hidden)
    attention_softmax_scale: float | None = None  # None: head_dim ** -0.5

    def __post_init__(self):
        if not self.pattern:
            self.pattern = MAMBA_BLOCK * self.num_layers
        if len(self.pattern) != self.num_layers:
            raise ConfigError(f"pattern {self.pattern!r} has {len(self.pattern)} blocks, "
                              f"num_layers is {self.num_layers}")
        if MOE_BLOCK in self.pattern:
            raise ConfigError(f"pattern {self.pattern!r} has MoE ('E') layers, which are not supported yet")
        unknown = set(self.pattern) - set(BLOCK_KINDS)
        if unknown:
            raise ConfigError(f"pattern {self.pattern!r} has unknown block kinds {sorted(unknown)} "
                              f"(M Mamba, * attention, - MLP, P parallel Mamba + attention)")
        self.ssm_multipliers = tuple(self.ssm_multipliers)

    @property
    def is_mamba2(self) -> bool:
        """Whether the Mamba mixers are Mamba-2's (heads, groups, SSD)."""
        return self.family in MAMBA2_MIXER_FAMILIES

    @property
    def is_hybrid(self) -> bool:
        return set(self.pattern) != {MAMBA_BLOCK}

    @property
    def has_attention(self) -> bool:
        return any(k in ATTENTION_BLOCKS for k in self.pattern)

    def multiplier(self, name: str) -> float:
        return float(self.multipliers.get(name, 1.0))

    @property
    def out_proj_bias(self) -> bool:
        return self.use_bias if self.mamba_out_bias is None else self.mamba_out_bias

    @property
    def hf_num_layers(self) -> int:
        """HF's num_hidden_layers: Falcon-H1's decoder layer is two of our blocks (P and -)."""
        return self.num_layers // 2 if self.family == FALCON_H1 else self.num_layers

    def padded_vocab_size(self, tp: int, multiple: int = 128) -> int:
        """Vocabulary rows padded so every rank holds an equal, 128-aligned slice (as Megatron does)."""
        step = multiple * tp
        return int(math.ceil(self.vocab_size / step) * step)

    def validate(self, tp: int) -> None:
        """Raise ConfigError naming the problem if this model cannot be split over `tp` ranks."""
        if tp < 1:
            raise ConfigError(f"tensor-parallel degree must be >= 1, got {tp}")
        if self.has_attention:
            self._validate_attention(tp)
        if self.has_shared_blocks:
            self._validate_shared(tp)
        if (MLP_BLOCK in self.pattern or self.has_shared_blocks) and self.mlp_intermediate_size % tp:
            raise ConfigError(f"TP degree {tp} does not divide the MLP's {self.mlp_intermediate_size} channels "
                              f"(intermediate_size)")
        if not any(k in MIXER_BLOCKS for k in self.pattern):
            return
        if self.is_mamba2:
            if self.num_heads * self.head_dim != self.intermediate_size:
                raise ConfigError(
                    f"num_heads ({self.num_heads}) x head_dim ({self.head_dim}) != intermediate_size "
                    f"({self.intermediate_size})")
            if self.num_heads % self.n_groups:
                raise ConfigError(f"num_heads ({self.num_heads}) is not a multiple of n_groups ({self.n_groups})")
            if self.num_heads % tp:
                raise ConfigError(
                    f"TP degree {tp} does not divide the {self.num_heads} Mamba-2 heads; "
                    f"use a TP degree that divides {self.num_heads}")
            if self.n_groups % tp and tp % self.n_groups:
                raise ConfigError(
                    f"TP degree {tp} and n_groups {self.n_groups}: one must divide the other "
                    f"(groups are split when tp divides n_groups, replicated when n_groups divides tp)")
        else:
            if self.intermediate_size % tp:
                raise ConfigError(
                    f"TP degree {tp} does not divide the {self.intermediate_size} Mamba channels "
                    f"(intermediate_size)")

    @property
    def has_shared_blocks(self) -> bool:
        return SHARED_BLOCK in self.pattern

    def _validate_shared(self, tp: int) -> None:
        if self.shared_blocks < 1:
            raise ConfigError(f"pattern {self.pattern!r} applies shared blocks (S) but shared_blocks is "
                              f"{self.shared_blocks}")
        if self.pattern.count(SHARED_BLOCK) < self.shared_blocks:
            raise ConfigError(f"{self.shared_blocks} shared blocks but only {self.pattern.count(SHARED_BLOCK)} "
                              f"positions apply them")
        if self.family == ZAMBA:
            heads = self.num_heads
            if heads < 1 or self.intermediate_size % heads:
                raise ConfigError(f"{self.intermediate_size} Mamba channels do not split into {heads} mamba heads")
            if heads % tp and tp % heads:
                raise ConfigError(f"TP degree {tp} and {heads} mamba heads: one must divide the other (whole heads "
                                  f"per rank, or each head over tp/heads ranks)")

    def _validate_attention(self, tp: int) -> None:
        heads, kv = self.num_attention_heads, self.num_kv_heads
        if heads < 1 or kv < 1 or self.attention_head_dim < 1:
            raise ConfigError(f"attention needs heads, kv heads and head_dim >= 1, got {heads}, {kv}, "
                              f"{self.attention_head_dim}")
        if heads % kv:
            raise ConfigError(f"{heads} attention heads are not a multiple of {kv} kv heads")
        if heads % tp:
            raise ConfigError(f"TP degree {tp} does not divide the {heads} attention heads; "
                              f"use a TP degree that divides {heads}")
        if kv % tp and tp % kv:
            raise ConfigError(f"TP degree {tp} and {kv} kv heads: one must divide the other (kv heads are split "
                              f"when tp divides them, replicated when they divide tp)")
        if self.rotary_dim % 2 or self.rotary_dim > self.attention_head_dim:
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and at most head_dim "
                              f"{self.attention_head_dim}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["time_step_limit"] = list(self.time_step_limit)
        d["ssm_multipliers"] = list(self.ssm_multipliers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SSMConfig":
        """Also reads the configs of checkpoints written before the hybrid fields existed."""
        d = dict(d)
        d["time_step_limit"] = tuple(d.get("time_step_limit", (0.0, float("inf"))))
        d["ssm_multipliers"] = tuple(d.get("ssm_multipliers", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict) -> "SSMConfig":
        """Read a HF transformers config.json dict (Mamba, FalconMamba or Mamba2)."""
        by_arch = {arch: f for f, (arch, _) in FAMILIES.items()}
        by_type = {t: f for f, (_, t) in FAMILIES.items()}
        family = None
        for arch in hf.get("architectures") or []:
            family = family or by_arch.get(arch)
        family = family or by_type.get(hf.get("model_type", ""))
        if family is None:
            raise ConfigError(
                f"not a supported model config: architectures={hf.get('architectures')} "
                f"model_type={hf.get('model_type')}; expected one of {sorted(by_arch)}")
        if family in (ZAMBA, ZAMBA2):
            from .zamba_config import from_hf_zamba

            try:
                return from_hf_zamba(cls, family, hf)
            except KeyError as e:
                raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        if family in (NEMOTRON_H, FALCON_H1):
            from .hybrid_configs import from_hf_hybrid

            try:
                return from_hf_hybrid(cls, family, hf)
            except KeyError as e:
                raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        try:
            hidden = int(hf["hidden_size"])
            expand = hf.get("expand", 2)
            intermediate = int(hf.get("intermediate_size") or expand * hidden)
            common = dict(
                family=family,
                hidden_size=hidden,
                num_layers=int(hf["num_hidden_layers"]),
                vocab_size=int(hf["vocab_size"]),
                intermediate_size=intermediate,
                state_size=int(hf.get("state_size", 128 if family == MAMBA2 else 16)),
                conv_kernel=int(hf.get("conv_kernel", 4)),
                use_bias=bool(hf.get("use_bias", False)),
                use_conv_bias=bool(hf.get("use_conv_bias", True)),
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", family != MAMBA2)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_first(hf.get("eos_token_id")),
                pad_token_id=hf.get("pad_token_id"),
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            )
            if hf.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
            if family == MAMBA2:
                limit = hf.get("time_step_limit") or (0.0, float("inf"))
                return cls(
                    **common,
                    num_heads=int(hf["num_heads"]),
                    head_dim=int(hf["head_dim"]),
                    n_groups=int(hf.get("n_groups", 1)),
                    chunk_size=int(hf.get("chunk_size", 256)),
                    time_step_limit=(_as_float(limit[0]), _as_float(limit[1])),
                )
            rank = hf.get("time_step_rank", "auto")
            rank = math.ceil(hidden / 16) if rank == "auto" else int(rank)
            return cls(
                **common,
                time_step_rank=rank,
                mixer_rms_eps=float(hf.get("mixer_rms_eps", 1e-6)) if family == FALCON_MAMBA else None,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "SSMConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"no config.json in {path}")
        try:
            return cls.from_hf(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None


def _as_float(x) -> float:
    """transformers writes non-finite floats into config.json as {"__float__": "Infinity"}."""
    return float(x["__float__"] if isinstance(x, dict) else x)


def hf_token_fields(hf: dict) -> dict:
    """Token ids and dtype as every family's config.json spells them."""
    return dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
                pad_token_id=hf.get("pad_token_id"),
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"))


def hf_common_fields(cfg: "SSMConfig") -> dict:
    """The head of the config.json written back for any family (the inverse of hf_token_fields plus
    the architecture and sizes every family has)."""
    arch, model_type = FAMILIES[cfg.family]
    return dict(architectures=[arch], model_type=model_type, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, dtype=cfg.torch_dtype,
                torch_dtype=cfg.torch_dtype)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x
