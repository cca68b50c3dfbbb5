"""Writing an HF transformers checkpoint: config.json and safetensors (sharded past a size), streamed."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import FALCON_H1, FALCON_MAMBA, FAMILIES, MAMBA2, NEMOTRON_H, ConfigError, SSMConfig
from .atomic import AtomicWriter
from .errors import CheckpointError
from .hf import INDEX_FILE, SINGLE_FILE
from .names import hf_key, hf_parts
from .safetensors_io import SafetensorsWriter
from .spec import TensorSpec

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what save_pretrained used for years


def hf_config_dict(cfg: SSMConfig) -> dict:
    """The config.json transformers needs to rebuild this model (the inverse of SSMConfig.from_hf)."""
    if cfg.has_shared_blocks:
        from ..zamba_config import hf_config_zamba

        return hf_config_zamba(cfg)
    if cfg.family in (NEMOTRON_H, FALCON_H1):
        from ..hybrid_configs import hf_config_hybrid

        return hf_config_hybrid(cfg)
    arch, model_type = FAMILIES[cfg.family]
    d = dict(architectures=[arch], model_type=model_type, hidden_size=cfg.hidden_size,
             num_hidden_layers=cfg.num_layers, vocab_size=cfg.vocab_size, state_size=cfg.state_size,
             conv_kernel=cfg.conv_kernel, use_bias=cfg.use_bias, use_conv_bias=cfg.use_conv_bias,
             layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32,
             tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu", bos_token_id=cfg.bos_token_id,
             eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
             # transformers 5 reads `dtype`, 4.x `torch_dtype`
             dtype=cfg.torch_dtype, torch_dtype=cfg.torch_dtype)
    H, I = cfg.hidden_size, cfg.intermediate_size
    if cfg.family == MAMBA2:
        if I % H:  # transformers' Mamba2 derives its width as expand * hidden_size
            raise ConfigError(f"intermediate_size {I} is not a multiple of hidden_size {H}: "
                              f"transformers' Mamba2ForCausalLM cannot express this model")
        d.update(expand=I // H, num_heads=cfg.num_heads, head_dim=cfg.head_dim, n_groups=cfg.n_groups,
                 chunk_size=cfg.chunk_size, time_step_limit=list(cfg.time_step_limit))
    else:
        # transformers derives intermediate_size from expand, then lets an explicit value win
        d.update(expand=max(1, I // H), intermediate_size=I, time_step_rank=cfg.time_step_rank)
        if cfg.family == FALCON_MAMBA:
            d["mixer_rms_eps"] = cfg.mixer_rms_eps
    return d


def plan_files(specs: list[TensorSpec], max_bytes: int) -> list[tuple[str, list[TensorSpec]]]:
    """Consecutive runs of tensors, each run one file of at most max_bytes (a bigger tensor gets its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class HFWriter(AtomicWriter):
    """with HFWriter(dir, cfg, specs) as w: w.write(name, tensor) in `specs` order (our names)."""

    format = "hf"

    def __init__(self, target: str | Path, cfg: SSMConfig, specs: list[TensorSpec], force: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.cfg = cfg
        self.config = hf_config_dict(cfg)  # before touching the disk: a model HF cannot express fails here
        super().__init__(target, force)
        # each of our tensors is one or more HF tensors (names.py), written in this order
        self._parts = {s.name: [(hf_key(part, cfg), rows) for part, rows in hf_parts(s.name, cfg)] for s in specs}
        self.files = plan_files([TensorSpec(key, (rows, *s.shape[1:]) if rows is not None else s.shape, s.dtype)
                                 for s in specs for key, rows in self._parts[s.name]], max_shard_bytes)
        self._file_of = {spec.name: i for i, (_, group) in enumerate(self.files) for spec in group}
        self._current: tuple[int, SafetensorsWriter] | None = None

    def __enter__(self) -> "HFWriter":
        super().__enter__()
        (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        parts = self._parts[name]
        pieces = [tensor] if len(parts) == 1 else tensor.split([rows for _, rows in parts])
        for (key, _), piece in zip(parts, pieces):
            i = self._file_of[key]
            if self._current is None or self._current[0] != i:
                self._close_current()
                fname, group = self.files[i]
                self._current = (i, SafetensorsWriter(self.tmp / fname, group, {"format": "pt"}))
            self._current[1].write(key, piece.contiguous())

    def _close_current(self) -> None:
        if self._current is not None:
            self._current[1].close()
            self._current = None

    def _finish(self) -> None:
        self._close_current()
        for fname, _ in self.files:
            if not (self.tmp / fname).is_file():
                raise CheckpointError(f"{self.target}: {fname} was never written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for _, g in self.files for s in g)},
                     "weight_map": {s.name: fname for fname, g in self.files for s in g}}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _discard(self) -> None:
        if self._current is not None:
            self._current[1].abort()
            self._current = None
