"""Session-wide test settings: measured backend choices go to a scratch cache, never the user's own;
tests marked `own_process` run in a pytest process of their own (tests/own_process.py); no test
leaves a SIGCHLD handler behind."""

import signal

import pytest
from own_process import pytest_runtest_logreport, pytest_runtest_protocol  # noqa: F401  (hooks, found here by pytest)


@pytest.fixture(autouse=True, scope="session")
def _scratch_backend_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DMT_JEPA_CACHE_DIR", str(tmp_path_factory.mktemp("dmt-jepa-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _no_child_signal_handler_left_behind():
    """A test that leaves a SIGCHLD handler installed fails (the handler is put back first).

    A handler left behind (torch's DataLoader installs one) has every later child's exit delivered to
    the interpreter; in full runs one such delivery killed the suite's process with a SIGSEGV raised
    by the kernel (dmt_jepa.data.pipeline.child_signal_restored says more).
    """
    before = signal.getsignal(signal.SIGCHLD)
    yield
    after = signal.getsignal(signal.SIGCHLD)
    if after is not before:
        signal.signal(signal.SIGCHLD, before)
        pytest.fail(f"the test left a SIGCHLD handler installed: {after!r}")
