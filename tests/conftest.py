import os
import tempfile

import pytest

# Every test session gets its own cache (demo data, features), so tests never read a stale one.
os.environ.setdefault("SSL_SUITE_CACHE", tempfile.mkdtemp(prefix="ssl-suite-test-cache-"))


@pytest.fixture(scope="session")
def demo_root():
    from datasets.catalog import ensure_demo

    return ensure_demo()
