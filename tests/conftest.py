"""Session-wide test settings: measured backend choices go to a scratch cache, never the user's own;
tests marked `own_process` run in a pytest process of their own (tests/own_process.py)."""

import pytest
from own_process import pytest_runtest_logreport, pytest_runtest_protocol  # noqa: F401  (hooks, found here by pytest)


@pytest.fixture(autouse=True, scope="session")
def _scratch_backend_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DMT_JEPA_CACHE_DIR", str(tmp_path_factory.mktemp("dmt-jepa-cache")))
    yield
    mp.undo()
