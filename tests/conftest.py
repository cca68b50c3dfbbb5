import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from distributed import RankPool  # noqa: E402

_pools: dict[tuple[int, int], RankPool] = {}


@pytest.fixture(scope="session")
def ranks():
    """ranks(n) -> a RankPool of n gloo ranks with Megatron's TP groups of size n (kept for the session);
    ranks(n, tp=t) -> n ranks as TP groups of t times context-parallel groups of n / t."""

    def get(n: int, tp: int | None = None) -> RankPool:
        key = (n, tp or n)
        if key not in _pools:
            _pools[key] = RankPool(n, tp)
        return _pools[key]

    yield get
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
