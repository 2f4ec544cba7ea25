import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Prepared data sets go to a test folder, not ~/.cache (subprocesses inherit it)."""
    os.environ["DISTCLUSTER_CACHE"] = str(tmp_path_factory.mktemp("distcluster-cache"))


@pytest.fixture(scope="session", autouse=True)
def _quiet_threads():
    # Two cores: keep each test process to its share so parallel pieces don't thrash.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    torch.set_flush_denormal(True)
