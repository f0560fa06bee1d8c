import pytest

from meshweave.testing import close_all_pools


@pytest.fixture(scope="session", autouse=True)
def _shutdown_worker_pools():
    yield
    close_all_pools()
