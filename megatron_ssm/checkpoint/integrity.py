"""The manifest every directory this tool writes carries: what wrote it and a checksum of each file.

    DIR/megatron_ssm_checkpoint.json   {"format": ..., "hash": "xxh3_128",
                                        "files": {"release/mp_rank_00/model_optim_rng.pt": {"bytes": N, "xxh3_128": HEX}, ...}}

Checksums are xxhash's XXH3-128, streamed in chunks (memory bandwidth fast, so a shard is verified
about as fast as it is read). A same-size corruption (a flipped byte, a bad disk block, a bad copy)
is found at load and by the converter instead of serving different text. The manifest also marks a
directory as ours, the only kind `--force` replaces. Manifests from before checksums (file ->
byte size) still load, with a warning.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import xxhash

from .errors import CheckpointError

MANIFEST = "megatron_ssm_checkpoint.json"
HASH = "xxh3_128"
CHUNK = 16 << 20
# Skips checksum verification at load (the server and every other load_model caller) when set to 1.
NO_VERIFY_ENV = "MEGATRON_SSM_NO_VERIFY"


class ChecksumError(CheckpointError):
    """A file whose bytes differ from the checksum its manifest recorded."""


def verify_default() -> bool:
    return os.environ.get(NO_VERIFY_ENV, "0").strip().lower() in ("", "0", "false", "no")


def file_digest(path: str | Path) -> str:
    h = xxhash.xxh3_128()
    buf = memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def write_manifest(directory: Path, fields: dict) -> None:
    """Record every file under `directory` (its size and checksum) with `fields` (format, ...)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, HASH: file_digest(path)}
    (directory / MANIFEST).write_text(json.dumps({**fields, "hash": HASH, "files": files}, indent=1) + "\n")


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of `directory`, None if it has none; a CheckpointError if it is unreadable."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None
    return manifest


def recorded(manifest: dict | None, rel: str) -> tuple[int | None, str | None]:
    """(bytes, checksum) the manifest holds for file `rel`; None for what it does not record."""
    entry = (manifest or {}).get("files", {}).get(rel)
    if isinstance(entry, int):  # before checksums: the size alone
        return entry, None
    if isinstance(entry, dict):
        size, digest = entry.get("bytes"), entry.get(HASH) if manifest.get("hash", HASH) == HASH else None
        return (size if isinstance(size, int) else None), (digest if isinstance(digest, str) else None)
    return None, None


def verify_files(directory: str | Path, rels: list[str], manifest: dict | None = None) -> None:
    """Check files `rels` of `directory` against their recorded checksums, raising ChecksumError
    naming the first that differs. Files without a checksum (older checkpoints) get a warning."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    unchecked = []
    for rel in rels:
        path = directory / rel
        size, digest = recorded(manifest, rel)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing ({MANIFEST} lists it)")
        if size is not None and path.stat().st_size != size:
            raise ChecksumError(f"{path} has {path.stat().st_size} bytes, {MANIFEST} says {size}: it is "
                                f"truncated or was changed after writing")
        if digest is None:
            unchecked.append(rel)
        elif file_digest(path) != digest:
            raise ChecksumError(checksum_message(path))
    if unchecked:
        warnings.warn(f"{directory}: no checksum recorded for {', '.join(unchecked[:3])}"
                      f"{' ...' if len(unchecked) > 3 else ''} (written before checksums): not verified; "
                      f"convert it again to add them", stacklevel=2)


def checksum_message(path: Path) -> str:
    return (f"{path} does not match its {HASH} checksum in {MANIFEST}: the file was damaged or changed "
            f"after it was written. Convert the checkpoint again (or pass --no-verify / "
            f"{NO_VERIFY_ENV}=1 to load it anyway)")


def ours(directory: Path) -> bool:
    """Whether `directory` was written by this tool: our manifest, with a format, is there."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError:
        return False
    return manifest is not None and isinstance(manifest.get("format"), str)
