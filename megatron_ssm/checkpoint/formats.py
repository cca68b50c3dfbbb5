"""Which checkpoint format a directory holds, told from its files (never from the user)."""
from __future__ import annotations

import json
from pathlib import Path

from .atomic import interrupted_hint
from .errors import CheckpointError
from .hf import HFCheckpoint
from .mamba_ssm import MambaSSMCheckpoint, is_mamba_ssm_config
from .megatron import TRACKER, MegatronCheckpoint
from .megatron_lm import MegatronLMCheckpoint, is_megatron_lm


def open_checkpoint(path: str | Path, verify: bool = True) -> HFCheckpoint | MambaSSMCheckpoint | MegatronCheckpoint \
        | MegatronLMCheckpoint:
    """A source of full (unsharded, HF-shaped) tensors with .config, .names(), .spec(), .read()
    (reader.CheckpointReader); a directory this tool wrote is verified against its checksums."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist{interrupted_hint(path)}")
    if (path / TRACKER).is_file():
        return MegatronLMCheckpoint(path, verify) if is_megatron_lm(path) else MegatronCheckpoint(path, verify)
    config = path / "config.json"
    if config.is_file():
        try:
            raw = json.loads(config.read_text())
        except ValueError as e:
            raise CheckpointError(f"{config} is not valid JSON: {e}") from None
        return MambaSSMCheckpoint(path, verify) if is_mamba_ssm_config(raw) else HFCheckpoint(path, verify)
    raise CheckpointError(f"cannot tell the format of {path}: it has neither config.json (HF or mamba-ssm) "
                          f"nor {TRACKER} (megatron-ssm){interrupted_hint(path)}")
