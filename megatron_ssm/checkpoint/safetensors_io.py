"""safetensors files read and written one tensor at a time with plain file I/O.

The `safetensors` package maps the whole file and copies tensors out of the map; every page it
touches then counts in the process's resident set until the file is closed, so converting a 14 GB
model would look like a 14 GB process. The format is simple enough (8-byte header length, JSON
header with dtype / shape / byte range per tensor, then the bytes) to read with seek + readinto
and to write with the header first, since every shape is known before any byte is written.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .errors import CheckpointError
from .spec import OrderedWriter, TensorSpec, read_into, write_from

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the reference implementation's own limit


class SafetensorsFile:
    """Header parsed up front (and checked against the file size); bytes read per tensor on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            self._f = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e}") from None
        try:
            self.metadata, self.specs, self._where = self._parse(size)
        except BaseException:
            self._f.close()
            raise

    def _parse(self, size: int):
        head = self._f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{self.path} is not a safetensors file ({size} bytes, truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{self.path}: header of {n} bytes does not fit in the {size}-byte file "
                                  f"(truncated or not safetensors)")
        try:
            header = json.loads(self._f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from None
        metadata = header.pop("__metadata__", None) or {}
        specs, where, end = {}, {}, 0
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            spec = TensorSpec(name, tuple(info["shape"]), dtype)
            start, stop = info["data_offsets"]
            if stop - start != spec.nbytes:
                raise CheckpointError(f"{self.path}: tensor {name} spans {stop - start} bytes, its shape "
                                      f"{spec.shape} needs {spec.nbytes}")
            specs[name], where[name] = spec, 8 + n + start
            end = max(end, stop)
        if 8 + n + end > size:
            raise CheckpointError(f"{self.path} is truncated: its header promises {8 + n + end} bytes, "
                                  f"the file has {size}")
        return metadata, specs, where

    def read(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        self._f.seek(self._where[name])
        return read_into(self._f, torch.empty(spec.shape, dtype=spec.dtype), f"{self.path} tensor {name}")

    def close(self) -> None:
        self._f.close()


class SafetensorsWriter(OrderedWriter):
    """Writes the header for `specs` at once, then takes their tensors in that order."""

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        super().__init__(path, specs)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for s in self.specs:
            header[s.name] = {"dtype": CODES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as the reference writer does
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._take(name, tensor)
        write_from(self._f, tensor)

    def abort(self) -> None:
        self._f.close()

    def close(self) -> None:
        self._f.close()
        self._check_complete()
