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

from .errors import CheckpointError

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


def looks_like_checkpoint(path: Path) -> bool:
    """What --force may replace: an empty directory or one holding a checkpoint of a known format."""
    return path.is_dir() and (not any(path.iterdir()) or (path / "config.json").is_file()
                              or (path / "latest_checkpointed_iteration.txt").is_file())


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
            if not looks_like_checkpoint(self.target):
                raise CheckpointError(f"{self.target} exists and is not a checkpoint directory; "
                                      f"refusing to replace it even with --force")

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
    clean exit `_finish()` completes the directory and it is published whole, and any failure,
    in `_finish` or before, discards it (`_discard` first releases what the writer holds open)."""

    def __init__(self, target: str | Path, force: bool = False):
        self.target = Path(target)
        self._atomic = AtomicDir(self.target, force)

    def __enter__(self):
        self.tmp = self._atomic.__enter__()
        return self

    def _finish(self) -> None:
        pass

    def _discard(self) -> None:
        pass

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as e:
                self._discard()
                self._atomic.__exit__(type(e), e, e.__traceback__)
                raise
        else:
            self._discard()
        self._atomic.__exit__(exc_type, exc, tb)
