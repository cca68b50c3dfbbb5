"""torch.save-format files (`.pt`, `pytorch_model.bin`) read and written one tensor at a time.

torch.save needs every tensor in memory at once, and torch.load(mmap=True) leaves every page it
touched resident, so neither keeps a 7B conversion small. Both directions use torch's own zip
container instead, so the files stay ordinary torch.load(weights_only=True) files:

- reading: torch.load(map_location="meta") unpickles the structure (with torch's weights-only
  safety) and records where each storage's bytes sit in the file; each tensor is then read from
  that offset when asked for (zip records are stored uncompressed).
- writing: the pickle holds placeholders that unpickle as `_rebuild_tensor_v2` of a storage named
  "data/<key>", exactly what torch.save writes; the zip records come in torch.save's order
  (data.pkl, then storages by key), each storage written as soon as its tensor is ready.

This leans on names torch.save and torch.load use themselves but do not make public:
torch._C.PyTorchFileWriter, torch._utils._rebuild_tensor_v2, torch.storage._dtype_to_storage_type_map
(all three in torch 2.6.0, 2.7.0 and 2.13, read in their source; pyproject asks for torch>=2.6) and
a storage's `_checkpoint_offset` (storage_offset below), whose absence falls back to an eager load.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError
from .spec import OrderedWriter, TensorSpec, read_into

PICKLE_PROTOCOL = 2  # torch.save's default
STORAGE_ALIGNMENT = 64  # PyTorchFileWriter's default, recorded as torch.save records it


def storage_offset(tensor: torch.Tensor) -> int | None:
    """Where the bytes of a meta tensor's storage start in the file torch.load read it from.

    torch.load(map_location="meta") records it as the storage's private `_checkpoint_offset` in the
    torch of this venv (2.13); 2.6.0 and 2.7.0 record it only under FakeTensorMode, and a pre-zip
    (legacy) file records None. Where it is missing the caller
    falls back to an eager load (tests/test_checkpoint.py forces that path)."""
    offset = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
    return offset if isinstance(offset, int) else None


class TorchStateFile:
    """`obj` is the unpickled file with meta tensors; `specs`/`read` serve the tensors of obj[key]
    (or of obj itself when key is None, as in pytorch_model.bin)."""

    def __init__(self, path: str | Path, key: str | None = None):
        self.path = Path(path)
        try:
            self.obj = torch.load(self.path, map_location="meta", weights_only=True)
        except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files
            raise CheckpointError(f"cannot read {self.path}: {e}") from None
        state = self.obj if key is None else (self.obj.get(key) if isinstance(self.obj, dict) else None)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path} holds no state dict{f' under {key!r}' if key else ''}")
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.specs = {k: TensorSpec(k, tuple(t.shape), t.dtype) for k, t in self._tensors.items()}
        self._f = None
        if not all(storage_offset(t) is not None for t in self._tensors.values()):
            self._load_eagerly(key)

    def _load_eagerly(self, key: str | None) -> None:
        """No offsets (a torch that records none for map_location="meta", or a pre-zip file):
        fall back to a memory-mapped load, which keeps the pages it reads resident."""
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy, pre-1.6 format cannot be mapped
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        state = obj if key is None else obj[key]
        self._tensors = {k: state[k] for k in self._tensors}

    def read(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        if t.device.type != "meta":
            return t.contiguous()
        if self._f is None:
            self._f = open(self.path, "rb")
        # the tensor may view part of a larger (or shared) storage: read just the span it covers
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        if (t.storage_offset() + span) * t.element_size() > t.untyped_storage().nbytes():
            raise CheckpointError(f"{self.path}: tensor {name} reaches past its storage")
        self._f.seek(storage_offset(t) + t.storage_offset() * t.element_size())
        flat = read_into(self._f, torch.empty(span, dtype=t.dtype), f"{self.path} tensor {name}")
        return flat.as_strided(t.shape, t.stride()).contiguous()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _Storage:
    """Pickled as torch.save pickles a storage: a persistent id naming record data/<key>."""

    def __init__(self, key: str, spec: TensorSpec):
        self.key, self.spec = key, spec


class _Tensor:
    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce_ex__(self, protocol):
        shape = self.storage.spec.shape
        stride = tuple(torch.empty(shape, device="meta").stride())
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, shape, stride, False, collections.OrderedDict())


def _storage_type(dtype: torch.dtype):
    # torch.save pickles a storage as its legacy typed class (torch.FloatStorage, ...); this private
    # map is how torch.save itself finds it (present in 2.6, 2.7 and 2.13, whose source was read).
    from torch.storage import _dtype_to_storage_type_map

    return getattr(torch, _dtype_to_storage_type_map()[dtype])


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return "storage", _storage_type(obj.spec.dtype), obj.key, "cpu", math.prod(obj.spec.shape)
        return None


class TorchFileWriter(OrderedWriter):
    """torch.save(build(state), path), where state maps each spec's name to its tensor, written as
    the tensors arrive (in `specs` order) instead of all at once."""

    def __init__(self, path: str | Path, specs: list[TensorSpec], build: Callable[[dict], Any] = lambda s: s):
        super().__init__(path, specs)
        state = collections.OrderedDict((s.name, _Tensor(_Storage(str(i), s))) for i, s in enumerate(self.specs))
        buf = io.BytesIO()
        _Pickler(buf, protocol=PICKLE_PROTOCOL).dump(build(state))
        self._zip = torch._C.PyTorchFileWriter(str(self.path))
        for name, data in (("data.pkl", buf.getvalue()), (".format_version", b"1"),
                           (".storage_alignment", str(STORAGE_ALIGNMENT).encode()), ("byteorder", b"little")):
            self._zip.write_record(name, data, len(data))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, spec = self._take(name, tensor)
        tensor = tensor.contiguous()
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != spec.nbytes:
            tensor = tensor.clone()  # a record is a whole storage; a slice of a bigger one needs its own
        self._zip.write_record(f"data/{index}", tensor.untyped_storage(), spec.nbytes)

    def close(self) -> None:
        self._check_complete()
        self._zip.write_end_of_file()
        del self._zip
