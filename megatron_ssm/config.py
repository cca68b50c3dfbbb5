"""One description of a Mamba model, read from a HuggingFace `config.json`.

Three families share it: Mamba-1 (`MambaForCausalLM`), Falcon-Mamba (Mamba-1 plus weightless RMS norms
on dt, B and C) and Mamba-2 (`Mamba2ForCausalLM`: heads, groups, chunked scan, gated RMSNorm).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAMBA1, FALCON_MAMBA, MAMBA2 = "mamba", "falcon_mamba", "mamba2"
FAMILIES = (MAMBA1, FALCON_MAMBA, MAMBA2)

_ARCHITECTURES = {
    "MambaForCausalLM": MAMBA1,
    "FalconMambaForCausalLM": FALCON_MAMBA,
    "Mamba2ForCausalLM": MAMBA2,
}
_MODEL_TYPES = {"mamba": MAMBA1, "falcon_mamba": FALCON_MAMBA, "mamba2": MAMBA2}


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

    @property
    def is_mamba2(self) -> bool:
        return self.family == MAMBA2

    @property
    def conv_dim(self) -> int:
        """Channels the causal conv1d runs over: x for Mamba-1, [x | B | C] for Mamba-2."""
        if self.is_mamba2:
            return self.intermediate_size + 2 * self.n_groups * self.state_size
        return self.intermediate_size

    def padded_vocab_size(self, tp: int, multiple: int = 128) -> int:
        """Vocabulary rows padded so every rank holds an equal, 128-aligned slice (as Megatron does)."""
        step = multiple * tp
        return int(math.ceil(self.vocab_size / step) * step)

    def validate(self, tp: int) -> None:
        """Raise ConfigError naming the problem if this model cannot be split over `tp` ranks."""
        if tp < 1:
            raise ConfigError(f"tensor-parallel degree must be >= 1, got {tp}")
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["time_step_limit"] = list(self.time_step_limit)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SSMConfig":
        d = dict(d)
        d["time_step_limit"] = tuple(d.get("time_step_limit", (0.0, float("inf"))))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict) -> "SSMConfig":
        """Read a HF transformers config.json dict (Mamba, FalconMamba or Mamba2)."""
        family = None
        for arch in hf.get("architectures") or []:
            family = family or _ARCHITECTURES.get(arch)
        family = family or _MODEL_TYPES.get(hf.get("model_type", ""))
        if family is None:
            raise ConfigError(
                f"not a Mamba config: architectures={hf.get('architectures')} model_type={hf.get('model_type')}; "
                f"expected one of {sorted(_ARCHITECTURES)}")
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


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x
