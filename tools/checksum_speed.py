#!/usr/bin/env python3
"""How fast checkpoint checksums verify: xxh3-128 (integrity.file_digest, 16 MiB chunks) over a
file of N GiB, from a cold page cache (posix_fadvise DONTNEED first) and a warm one, and the pure
in-memory hash rate. A rank verifies its own shard at load, so its cost is shard size / rate.

    python tools/checksum_speed.py --file /tmp/ckpt-hash.bin --gib 4     (the file is made if absent)
"""
from __future__ import annotations

import argparse
import os
import time

import xxhash

from megatron_ssm.checkpoint.integrity import file_digest


def _drop_from_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", required=True, help="file to hash (random bytes are written to it if its size differs)")
    ap.add_argument("--gib", type=int, default=4, help="its size in GiB")
    ap.add_argument("--keep", action="store_true", help="keep the file afterwards")
    args = ap.parse_args()
    size = args.gib << 30
    if not os.path.exists(args.file) or os.path.getsize(args.file) != size:
        block = os.urandom(64 << 20)
        with open(args.file, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    for label, cold in (("cold page cache", True), ("warm page cache", False), ("warm page cache", False)):
        if cold:
            _drop_from_cache(args.file)
        t = time.perf_counter()
        file_digest(args.file)
        dt = time.perf_counter() - t
        print(f"{label:18s} {size / 2**20:8.0f} MiB in {dt:6.2f} s = {size / 2**20 / dt:6.0f} MiB/s", flush=True)
    buf = os.urandom(256 << 20)
    t = time.perf_counter()
    h = xxhash.xxh3_128()
    for _ in range(8):
        h.update(buf)
    dt = time.perf_counter() - t
    print(f"{'in memory':18s} {2048:8.0f} MiB in {dt:6.2f} s = {2048 / dt:6.0f} MiB/s")
    if not args.keep:
        os.unlink(args.file)


if __name__ == "__main__":
    main()
