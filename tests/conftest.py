import os
import sys
from pathlib import Path

import pytest
import torch

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


def thread_share() -> int:
    """Torch threads for one test process. Two cores: under `make test` two test processes run
    side by side, one thread each (spinning OpenMP threads of two processes on two cores slow
    both many times over)."""
    return 1 if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1" else 2


def pytest_configure(config):
    # Before the test modules are imported: distcluster.data.ffcv_io records torch's thread count
    # at import as the one its loaders use (and impose on torch).
    os.environ.setdefault("OMP_NUM_THREADS", str(thread_share()))
    torch.set_num_threads(thread_share())
    torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _thread_share_each_test():
    """Each test starts at the process's share, whatever the last one left: FFCV sets torch's
    thread count to its loader's whenever it builds one. (With the share set once, after
    collection, test processes drifted to two threads: test_core's 15-epoch digits run took
    100 s of CPU under `make test` against 17 s alone.)"""
    torch.set_num_threads(thread_share())


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray head for the session (one per xdist worker): runs join it through
    `ray_cluster.env` instead of each starting and stopping a local instance (about 6 s each).
    Runs that kill a node need a cluster of their own (test_elastic); a killed driver or worker
    is fine here, Ray ends the job's actors and releases their CPUs."""
    from servers import ray_head

    with ray_head() as head:
        yield head
