import atexit
import os
import shutil
import tempfile

import pytest

# Under pytest-xdist each worker gets its share of the cores, set before torch is imported (subprocesses inherit
# it): torch's default of one thread per core in every worker oversubscribes them, and its threads then spin
# (2 workers on 2 cores: 364 s with the default, 211 s with one thread each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

# Every test session gets its own cache (demo data, features), so tests never read a stale one; the process that
# made it (under pytest-xdist the controller, whose workers inherit it) removes it when it exits.
if "SSL_SUITE_CACHE" not in os.environ:
    os.environ["SSL_SUITE_CACHE"] = tempfile.mkdtemp(prefix="ssl-suite-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SSL_SUITE_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def demo_root():
    from datasets.catalog import ensure_demo

    return ensure_demo()


# make test hands whole modules to its workers in this order (pytest -n auto --dist loadscope
# --no-loadscope-reorder): the longest first, as measured with 2 workers on 2 cores, so that the workers end
# together; the modules not named follow in file order. The order changes nothing else: no module depends on
# another's files (the feature cache they share gives the same features whoever wrote them, and the tests that
# count its hits and misses use a cache of their own or a checkpoint only their module saves).
LONGEST_FIRST = ("test_pretrain", "test_run", "test_linear_sgd", "test_formats", "test_detection", "test_launch",
                 "test_voc07_svm", "test_torchrun_frozen", "test_feature_cache", "test_vit", "test_frozen_vit",
                 "test_wmse_protocol", "test_report", "test_checkpoints")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
