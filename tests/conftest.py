import pytest

from meshweave.testing import close_all_pools

# Files in the order they are handed out under `pytest -n 2 --dist loadfile`: longest first (rough seconds per file
# in the full suite on 2 loaded cores, measured; unlisted files take well under a minute). xdist's own order (most
# tests first) put the files of one to four long end-to-end tests (multi-node, SLURM, resume) at the end, where one
# worker ran them for minutes while the other had nothing left. Longest-first leaves only short files for the end.
# This is a scheduling hint only: every test still runs, in its file's own order.
FILE_SECONDS = {
    "tests/test_swarm.py": 600,
    "tests/test_multinode.py": 450,
    "tests/test_failures_interrupts.py": 350,
    "tests/test_tp_pp.py": 300,
    "tests/test_resume.py": 250,
    "tests/test_adaptive_sp.py": 250,
    "tests/test_failures.py": 200,
    "tests/test_slurm.py": 200,
    "tests/test_dsp.py": 150,
    "tests/test_launch.py": 150,
    "tests/test_checkpoint_crash.py": 150,
    "tests/test_slurm_multinode.py": 110,
    "tests/test_bench_cli.py": 100,
    "tests/test_linear_attention_models.py": 100,
    "tests/test_long_context_recipe.py": 80,
    "tests/test_attention_sp.py": 60,
    "tests/test_checkpoint_dist.py": 60,
    "tests/test_sp_training.py": 60,
    "tests/test_model_specs.py": 45,
}


def pytest_configure(config):
    # xdist's --loadscope-reorder (on by default) would sort the files by their number of tests instead
    if getattr(config.option, "loadscopereorder", None) is not None:
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def file_of(item):
        return item.nodeid.split("::", 1)[0]

    first = {}
    for i, item in enumerate(items):
        first.setdefault(file_of(item), i)
    items.sort(key=lambda item: (-FILE_SECONDS.get(file_of(item), 0), first[file_of(item)]))


@pytest.fixture(scope="session", autouse=True)
def _shutdown_worker_pools():
    yield
    close_all_pools()
