"""A directory that appears complete or not at all.

Everything is written into `.NAME.partial-PID-XXXX` beside the target and renamed onto it at the
end, so a killed run leaves only that hidden directory (which the next run of the same target
removes once its process is gone) and never a target that looks like a checkpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..tokenizer import COPIED_FILES, write_tokenizer_files
from .errors import CheckpointError
from .integrity import MANIFEST, ours, read_manifest, write_manifest

PARTIAL = ".partial-"


def _partial_prefix(target: Path) -> str:
    return f".{target.name}{PARTIAL}"


def leftovers(target: str | Path) -> list[Path]:
    """Partial directories an interrupted write of `target` left behind."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(_partial_prefix(target) + "*"))


def interrupted_hint(target: str | Path) -> str:
    left = leftovers(target)
    if not left:
        return ""
    return (f"; an interrupted conversion left {left[0].name} beside it (not a usable checkpoint): "
            f"rerun the conversion")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Files of ours that manifests from before checksums did not list.
_UNLISTED_BEFORE_CHECKSUMS = ("latest_checkpointed_iteration.txt",) + COPIED_FILES


def refusal(path: Path) -> str | None:
    """Why --force may not replace `path` (None: it may). Only an empty directory or one this tool
    wrote, holding nothing but what its manifest lists, is replaced: anything else may be a user's."""
    if not path.is_dir():
        return f"{path} exists and is not a directory"
    if not any(path.iterdir()):
        return None
    manifest = read_manifest(path) if ours(path) else None
    if manifest is None:
        return (f"{path} exists and was not written by megatron-ssm (it has no {MANIFEST}); --force replaces "
                f"only a checkpoint this tool wrote or an empty directory. Nothing was deleted: remove it "
                f"yourself or choose another --save-dir")
    listed = set(manifest["files"]) | {MANIFEST}
    if not any(isinstance(v, dict) for v in manifest["files"].values()):
        listed |= set(_UNLISTED_BEFORE_CHECKSUMS)
    others = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                    if not p.is_dir() and p.relative_to(path).as_posix() not in listed)
    if others:
        return (f"{path} is a megatron-ssm checkpoint but also holds {', '.join(others[:5])}"
                f"{' ...' if len(others) > 5 else ''}, which it did not write; --force will not delete them. "
                f"Nothing was deleted: move them out or choose another --save-dir")
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


class AtomicDir:
    """with AtomicDir(target, force) as tmp: ...write into tmp...  -> renamed onto target on success."""

    def __init__(self, target: str | Path, force: bool = False):
        self.target = Path(target)
        if self.target.exists():
            if not force:
                raise CheckpointError(f"{self.target} already exists; pass --force to overwrite it")
            reason = refusal(self.target)
            if reason:
                raise CheckpointError(reason)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for old in leftovers(self.target):
            pid = old.name[len(_partial_prefix(self.target)):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(self.target)}{os.getpid()}-",
                                         dir=self.target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the checkpoint private
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        # The rename must not reach the disk before the data does, or a power cut could leave a
        # complete-looking directory of partly written files.
        _fsync_tree(self.tmp)
        # Swap, don't delete first: a crash between the two renames keeps the old copy (hidden).
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.replaced-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        _fsync(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class AtomicWriter:
    """Base of the checkpoint writers: `with Writer(target, ...) as w:` writes into `w.tmp`; on a
    clean exit `_finish()` completes the directory, the manifest (`manifest_fields()` plus every
    file's checksum) is written and the directory is published whole; any failure, in `_finish` or
    before, discards it (`_discard` first releases what the writer holds open)."""

    format = "megatron-ssm"

    def __init__(self, target: str | Path, force: bool = False):
        self.target = Path(target)
        self._atomic = AtomicDir(self.target, force)

    def __enter__(self):
        self.tmp = self._atomic.__enter__()
        return self

    def _finish(self) -> None:
        pass

    def manifest_fields(self) -> dict:
        return {"format": self.format}

    def copy_tokenizer(self, source_dir: str | Path) -> None:
        """The source's tokenizer, always with the HF files AutoTokenizer reads (tokenizer.py)."""
        write_tokenizer_files(source_dir, self.tmp)

    def _discard(self) -> None:
        pass

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._finish()
                write_manifest(self.tmp, self.manifest_fields())
            except BaseException as e:
                self._discard()
                self._atomic.__exit__(type(e), e, e.__traceback__)
                raise
        else:
            self._discard()
        self._atomic.__exit__(exc_type, exc, tb)
