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
from .names import Parts, hf_parts, strip_prefix
from .partition import hf_names
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
    """HF tensor name -> ours for the Mamba families (1:1): drop `backbone.`; old Mamba
    checkpoints say `embedding`, not `embeddings`. Other families: names.py."""
    return strip_prefix(hf_name)


def hf_name(name: str) -> str:
    """Ours -> the name transformers writes today, for the Mamba families (1:1)."""
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
        """self._where: our name -> [(file, name inside the file)] of the HF tensors concatenated to
        make it (names.py); a tensor the map does not know keeps its own (stripped) name."""
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
        self._parts: dict[str, Parts] = {}
        part_of: dict[str, tuple[str, int]] = {}
        try:
            for name in hf_names(self.config):
                self._parts[name] = hf_parts(name, self.config)
                for i, (part, _) in enumerate(self._parts[name]):
                    part_of[part] = (name, i)
        except (KeyError, AttributeError):  # a config too broken to name its tensors: 1:1
            pass
        found: dict[str, dict[int, tuple[Path, str]]] = {}
        for key, file in pairs:
            stripped = strip_prefix(key)
            name, i = part_of.get(stripped, (stripped, 0))
            if i in found.get(name, {}):
                raise CheckpointError(f"{self.path} holds tensor {stripped} twice ({found[name][i][1]} and {key})")
            if key not in self._open(file).specs:
                raise CheckpointError(f"{file.name} lacks tensor {key}, which its index names")
            found.setdefault(name, {})[i] = (file, key)
        # a packed tensor exists only when every part does (else it is reported missing)
        self._where = {name: [got[i] for i in range(len(got))] for name, got in found.items()
                       if len(got) == len(self._parts.get(name, [None]))}

    def names(self) -> list[str]:
        return list(self._where)

    def spec(self, name: str) -> TensorSpec:
        specs = [self._files[file].specs[key] for file, key in self._where[name]]
        shape = specs[0].shape if len(specs) == 1 else (sum(s.shape[0] for s in specs), *specs[0].shape[1:])
        if len({s.dtype for s in specs}) > 1:
            raise CheckpointError(f"{self.path}: the parts of tensor {name} have different dtypes")
        return TensorSpec(name, tuple(shape), specs[0].dtype)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.path} lacks tensor {name}")
        parts = [self._files[file].read(key) for file, key in self._where[name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class HFCheckpoint(TensorDir):
    """An HF transformers model directory: config.json plus its weights."""

    format = "HF transformers"

    def __init__(self, path: str | Path, verify: bool = True):
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"HF checkpoint directory {path} does not exist")
        super().__init__(path, SSMConfig.from_hf_dir(path), verify)
