"""Reading HF-format Mamba checkpoints tensor by tensor (safetensors, single file or sharded)."""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..config import SSMConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


def our_name(hf_name: str) -> str:
    """HF tensor name -> ours: drop `backbone.`; old Mamba checkpoints say `embedding`, not `embeddings`."""
    name = hf_name.removeprefix("backbone.")
    return "embeddings.weight" if name == "embedding.weight" else name


class HFCheckpoint:
    """An HF model directory: its config and a lazy view of its tensors (nothing loaded up front)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"HF checkpoint directory {self.path} does not exist")
        self.config = SSMConfig.from_hf_dir(self.path)
        self._files = self._tensor_files()  # our name -> (file, hf name)

    def _tensor_files(self) -> dict[str, tuple[Path, str]]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {our_name(k): (self.path / v, k) for k, v in weight_map.items()}
            for f in {f for f, _ in files.values()}:
                if not f.is_file():
                    raise CheckpointError(f"{index.name} names {f.name}, which is missing from {self.path}")
            return files
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}")
        try:
            with safe_open(single, framework="pt") as f:
                return {our_name(k): (single, k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"cannot read {single}: {e}") from None

    def names(self) -> list[str]:
        return list(self._files)

    def tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (our name, tensor) one at a time, opening each shard file once."""
        names = list(self._files) if names is None else names
        missing = [n for n in names if n not in self._files]
        if missing:
            raise CheckpointError(f"{self.path} lacks tensor(s): {', '.join(missing[:5])}")
        with ExitStack() as stack:
            handles = {}
            for name in names:
                file, key = self._files[name]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt"))
                try:
                    yield name, handles[file].get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {key} from {file}: {e}") from None
