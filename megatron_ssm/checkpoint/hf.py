"""Reading HF-layout weight directories tensor by tensor: safetensors or pytorch_model.bin, single
file or sharded with an index. HF transformers checkpoints and mamba-ssm's native ones share this
layout and these tensor names; they differ only in config.json (see mamba_ssm.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import SSMConfig
from ..tokenizer import COPIED_FILES
from .errors import CheckpointError
from .reader import CheckpointReader
from .safetensors_io import SafetensorsFile
from .spec import TensorSpec
from .torch_stream import TorchStateFile

__all__ = ["CheckpointError", "HFCheckpoint", "TensorDir", "our_name", "hf_name", "WEIGHT_FILES"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# looked for in this order; the first present wins
WEIGHT_FILES = (INDEX_FILE, SINGLE_FILE, "pytorch_model.bin.index.json", "pytorch_model.bin")
TOKENIZER_FILES = COPIED_FILES  # carried along by every conversion (AtomicWriter.copy_tokenizer)


def our_name(hf_name: str) -> str:
    """HF tensor name -> ours: drop `backbone.`; old Mamba checkpoints say `embedding`, not `embeddings`."""
    name = hf_name.removeprefix("backbone.")
    return "embeddings.weight" if name == "embedding.weight" else name


def hf_name(name: str) -> str:
    """Ours -> the name transformers writes today."""
    return name if name == "lm_head.weight" else f"backbone.{name}"


def open_tensor_file(path: Path):
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchStateFile(path)


class TensorDir(CheckpointReader):
    """The weights of an HF-layout directory: headers read up front, tensor bytes on demand."""

    def __init__(self, path: str | Path, config: SSMConfig, verify: bool = True):
        super().__init__(path)
        self.config = config
        self._opening(self._locate, verify)

    def _open(self, file: Path):
        if file not in self._files:
            if not file.is_file():
                raise CheckpointError(f"{file.name}, named by the index in {self.path}, is missing")
            self._files[file] = open_tensor_file(file)
        return self._files[file]

    def _locate(self) -> None:
        """self._where: our name -> (file, name inside the file)."""
        chosen = next((self.path / n for n in WEIGHT_FILES if (self.path / n).is_file()), None)
        if chosen is None:
            raise CheckpointError(f"no {', '.join(WEIGHT_FILES[:-1])} or {WEIGHT_FILES[-1]} in {self.path}")
        if chosen.name.endswith(".index.json"):
            try:
                weight_map = json.loads(chosen.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{chosen} is not a valid weight index ({e!r})") from None
            pairs = [(key, self.path / file) for key, file in weight_map.items()]
        else:
            pairs = [(key, chosen) for key in self._open(chosen).specs]
        where: dict[str, tuple[Path, str]] = {}
        for key, file in pairs:
            name = our_name(key)
            if name in where:
                raise CheckpointError(f"{self.path} holds tensor {name} twice ({where[name][1]} and {key})")
            if key not in self._open(file).specs:
                raise CheckpointError(f"{file.name} lacks tensor {key}, which its index names")
            where[name] = (file, key)
        self._where = where

    def names(self) -> list[str]:
        return list(self._where)

    def spec(self, name: str) -> TensorSpec:
        file, key = self._where[name]
        s = self._files[file].specs[key]
        return TensorSpec(name, s.shape, s.dtype)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.path} lacks tensor {name}")
        file, key = self._where[name]
        return self._files[file].read(key)


class HFCheckpoint(TensorDir):
    """An HF transformers model directory: config.json plus its weights."""

    format = "HF transformers"

    def __init__(self, path: str | Path, verify: bool = True):
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"HF checkpoint directory {path} does not exist")
        super().__init__(path, SSMConfig.from_hf_dir(path), verify)
