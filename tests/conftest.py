import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

# The longest files (measured under `make test`), started first so that neither test process is
# left with a long one at the end; the rest follow in their usual order.
LONGEST_FIRST = ("test_elastic.py", "test_models.py", "test_recovery.py", "test_failures.py",
                 "test_tune.py", "test_ffcv_shards.py", "test_train_e2e.py", "test_prepare_ray.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a file


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Prepared data sets go to a test folder, not ~/.cache (subprocesses inherit it)."""
    os.environ["DISTCLUSTER_CACHE"] = str(tmp_path_factory.mktemp("distcluster-cache"))


@pytest.fixture(scope="session", autouse=True)
def _quiet_threads():
    # Two cores: keep each test process to its share so parallel pieces don't thrash. Under
    # `make test` two test processes run side by side: one thread each (spinning OpenMP threads
    # of two processes on two cores slow both many times over).
    threads = 1 if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1" else 2
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray head for the session (one per xdist worker): runs join it through
    `ray_cluster.env` instead of each starting and stopping a local instance (about 6 s each).
    Runs that kill a node need a cluster of their own (test_elastic); a killed driver or worker
    is fine here, Ray ends the job's actors and releases their CPUs."""
    from servers import ray_head

    with ray_head() as head:
        yield head
