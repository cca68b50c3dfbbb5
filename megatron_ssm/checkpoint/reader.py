"""What every checkpoint reader open_checkpoint returns shares: full (unsharded, HF-shaped) tensors
by our names, the files it holds open, and the manifest check of a directory this tool wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import SSMConfig
from .integrity import read_manifest, verify_files
from .spec import TensorSpec


class CheckpointReader:
    """Subclasses set `format`, `config` and the file readers in `_files` (anything with .close()),
    and implement names(), spec() and read(). `with Reader(path) as src:` closes them all."""

    format: str
    config: SSMConfig

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._files: dict = {}

    def _opening(self, open_all: Callable[[], None], verify: bool) -> None:
        """Run `open_all`, closing whatever it opened if it fails; first, if this tool wrote the
        directory and `verify`, check every file against the checksums in its manifest."""
        try:
            manifest = read_manifest(self.path)
            if verify and (manifest is not None or self.unlisted_files()):
                verify_files(self.path, sorted(manifest["files"]) if manifest else self.unlisted_files(), manifest)
            open_all()
        except BaseException:
            self.close()
            raise

    def unlisted_files(self) -> list[str]:
        """Files a directory of this format should have checksums for when it has no manifest
        (ours from before manifests: verify_files warns that they are unchecked)."""
        return []

    def names(self) -> list[str]:
        raise NotImplementedError

    def spec(self, name: str) -> TensorSpec:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
