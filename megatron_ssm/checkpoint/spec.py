"""What a tensor file promises before its bytes are read or written: name, shape and dtype."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def check(self, tensor: torch.Tensor, where: str) -> None:
        """Writers call this so a file never holds bytes that disagree with its own header."""
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise CheckpointError(f"{where}: tensor {self.name} is {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"expected {self.dtype} {self.shape}")


class OrderedWriter:
    """A file whose header already lists `specs`: it takes their tensors in exactly that order."""

    def __init__(self, path: str | Path, specs: list[TensorSpec]):
        self.path, self.specs, self._next = Path(path), list(specs), 0

    @property
    def done(self) -> bool:
        return self._next == len(self.specs)

    def _take(self, name: str, tensor: torch.Tensor) -> tuple[int, TensorSpec]:
        """(index, spec) of `tensor` if it is the next one expected; raises naming it otherwise."""
        if self.done or self.specs[self._next].name != name:
            expected = "nothing more" if self.done else self.specs[self._next].name
            raise CheckpointError(f"{self.path}: got tensor {name}, expected {expected}")
        index, spec = self._next, self.specs[self._next]
        spec.check(tensor, str(self.path))
        self._next += 1
        return index, spec

    def _check_complete(self) -> None:
        if not self.done:
            raise CheckpointError(f"{self.path}: closed after {self._next} of {len(self.specs)} tensors")


CHUNK = 1 << 28  # one read()/write() call moves at most 2 GiB on Linux: go in smaller steps


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (numpy has no bfloat16, uint8 views work)."""
    if not tensor.is_contiguous():
        raise ValueError("as_bytes needs a contiguous tensor")
    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_from(f, tensor: torch.Tensor) -> None:
    buf = as_bytes(tensor.contiguous())
    for start in range(0, len(buf), CHUNK):
        f.write(buf[start:start + CHUNK])


def read_into(f, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Fill contiguous `tensor` from file `f` at its current position, failing on a short read."""
    buf = as_bytes(tensor)
    done = 0
    while done < len(buf):
        got = f.readinto(buf[done:done + CHUNK])
        if not got:
            raise CheckpointError(f"{what}: the file ends after {done} of {len(buf)} bytes (truncated?)")
        done += got
    return tensor
