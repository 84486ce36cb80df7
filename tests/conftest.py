"""Session-wide test settings: measured backend choices go to a scratch cache, never the user's own."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_backend_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DMT_JEPA_CACHE_DIR", str(tmp_path_factory.mktemp("dmt-jepa-cache")))
    yield
    mp.undo()
