import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# Without CUDA the Triton kernels run in Triton's CPU interpreter (tests/interpreter.py). Triton reads
# the variable when it is first imported, so it is set here, before any test module imports it. The
# package imports triton only for CUDA tensors, so nothing else changes.
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist's workers (make test runs 2) share the cores: each takes its share of torch's threads
# instead of every worker starting one per core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# The modules that take longest on CI's 2 cores (serial: test_server 130 s, the rest 40-80 s each),
# collected first: `--dist loadfile` hands modules to workers in collection order, so the last one to
# start is short and the two workers finish together.
LONGEST_FIRST = ("test_server.py", "test_zamba.py", "test_tools.py", "test_cli.py", "test_ops.py",
                 "test_checkpoint.py", "test_tp8.py", "test_context_parallel.py", "test_server_hf.py")

from distributed import RankPool  # noqa: E402
from hf_models import SEED_ENV, fresh_seed, seeds_drawn_for  # noqa: E402

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


@pytest.fixture
def seed():
    """A fresh seed (torch's global generator seeded with it too), listed in the report on failure."""
    import torch

    s = fresh_seed(per_test=True)
    torch.manual_seed(s)
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        seeds = seeds_drawn_for(item.nodeid)
        if seeds:
            report.sections.append(("fresh seeds (replay one with " + SEED_ENV + "=N)", "\n".join(seeds)))


def pytest_collection_modifyitems(config, items):
    import torch

    if os.environ.get("MEGATRON_SSM_MUTATION") == "1":
        # tools/mutation.sh: only single-process tests (a rank pool's processes would neither see the
        # mutant's coverage nor cost seconds), and no interpreted kernels (slow, not the mutated code)
        keep = [i for i in items if "ranks" not in getattr(i, "fixturenames", ()) and "interpreted" not in i.name]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep

    if os.environ.get("PYTEST_XDIST_WORKER"):  # not in a serial run (make test-random keeps its order)
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
