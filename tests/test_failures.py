"""Failures end with one line: start-up checks, failing workers, a checkpoint that cannot be written.

Cases found before any worker starts run in-process through the CLI's entry point (two also end to end); the
others run `meshweave train` as a subprocess in its own session with its own TMPDIR (tests/failure_support.py)
and assert the exit status, exactly one line on stderr (no traceback), that no process of the session is
left, that nothing is left in TMPDIR (torch elastic's directories and error files, multiprocessing's
directories; torch's compile cache excepted), and that the run directory is either absent (refused at
start-up) or complete (config.yaml, plus the failing rank's log). Interrupts, torchrun and four-worker drills:
tests/test_failures_interrupts.py.
"""


import pytest

from meshweave.testing import run_distributed
from tests.failure_support import (
    LONG,
    TINY,
    Run,
    assert_clean_end,
    assert_failed_run_dir,
    assert_no_run_dir,
    main_in_process,
)


# --- refused before any worker starts --------------------------------------------------------
@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    (root / "empty").mkdir()
    (root / "binary").mkdir()
    (root / "binary" / "a.txt").write_bytes(bytes(range(256)) * 40)
    (root / "binary" / "b.md").write_bytes(b"text\0more")
    (root / "small").mkdir()
    (root / "small" / "a.txt").write_text("hello world\n")
    (root / "afile").write_text("not a directory\n")
    return root


START_UP_CASES = [
    ("empty dir", ["data.source=path", "data.path={root}/empty"], 3, "data error: data.path: '{root}/empty' holds no text"),
    ("all binary", ["data.source=path", "data.path={root}/binary"], 3, "are all binary (they hold NUL bytes)"),
    ("corpus too small", ["data.source=path", "data.path={root}/small"], 3,
     "data error: train.seq_len: 16 is longer than the whole corpus (14 tokens"),
    ("seq_len over the corpus", ["train.seq_len=100000"], 3, "train.seq_len: 100000 is longer than the whole corpus"),
    ("no such data", ["data.source=path", "data.path={root}/missing"], 3,
     "filesystem error: data.path: '{root}/missing' does not exist"),
    ("run dir under a file", ["run_dir={root}/afile/run"], 3, "filesystem error: run_dir: '{root}/afile/run' is not writable"),
    ("checkpoint dir under a file", ["checkpoint.dir={root}/afile/ck"], 3, "checkpoint.dir: '{root}/afile/ck' is not writable"),
    ("model too large for memory", ["model.n_layers=10000000"], 2, "config error: memory: 2 rank(s) on this machine need"),
    ("data budget too large for memory", ["data.source=synthetic", "data.max_bytes=1000000000000000"], 2,
     "GiB data"),
    ("non-finite learning rate", ["train.lr=.nan"], 2, "config error: train.lr: nan is not a finite number"),
]
# End to end in a subprocess: one data case (exit 3) and one value case (exit 2). Every case, those included, also
# runs in-process below: the checks end before any process starts, and a subprocess per case cost seconds of
# interpreter and torch start-up each (most of a minute per case when the suite loads the 2 cores).
SUBPROCESS_START_UP = {"empty dir", "non-finite learning rate"}


@pytest.mark.parametrize("name,args,status,expected", [case for case in START_UP_CASES if case[0] in SUBPROCESS_START_UP])
def test_start_up_problem_is_one_line_before_any_worker(tmp_path, corpora, name, args, status, expected):
    run_dir = tmp_path / "run"
    sets = [x for a in args for x in ("--set", a.format(root=corpora))]
    run = Run(tmp_path, [*TINY, "--set", f"run_dir={run_dir}", *sets])
    assert_clean_end(run, status, expected.format(root=corpora))
    assert_no_run_dir(run_dir)


@pytest.mark.parametrize("name,args,status,expected", START_UP_CASES)
def test_start_up_problem_in_process_is_one_line_and_starts_nothing(tmp_path, corpora, capfd, name, args, status,
                                                                     expected):
    """`meshweave train`'s own entry point in this process: the status, one stderr line, no run directory, and no
    child process started (the checks all run before the launcher starts any)."""
    run_dir = tmp_path / "run"
    sets = [x for a in args for x in ("--set", a.format(root=corpora))]
    code, err = main_in_process([*TINY, "--set", f"run_dir={run_dir}", *sets], capfd)
    assert code == status and len(err) == 1 and "Traceback" not in err[0], err
    assert expected.format(root=corpora) in err[0]
    assert_no_run_dir(run_dir)


def _train_tiny_with_checkpoint(root: str) -> None:
    from meshweave.train.build import build_trainer
    from meshweave.train.config import load_config

    trainer = build_trainer(load_config(None, [*TINY[1::2], f"run_dir={root}/run", f"checkpoint.dir={root}/ck"]))
    trainer.train()  # saves the final step's checkpoint
    trainer.p.mesh.close()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A committed checkpoint of the tiny model (one 2-step run on 2 ranks, as `meshweave train` would run it; on
    the test harness's pooled workers: the tests below read it at start-up, and a `meshweave train` subprocess
    cost three interpreter start-ups)."""
    root = tmp_path_factory.mktemp("ckpt")
    run_distributed(_train_tiny_with_checkpoint, 2, str(root))
    assert (root / "ck" / "latest").is_file()
    return root / "ck"


@pytest.mark.slow  # trains a checkpoint first
@pytest.mark.parametrize("change,expected", [
    (["model.dim=64", "model.ffn_hidden=64"], "'tok_embeddings.weight' has shape [320, 32] there but [320, 64]"),
    (["model.n_layers=2"], "tensor(s) of this model are not in it, e.g. 'layers.1."),
])
def test_resuming_a_checkpoint_of_another_model_is_refused_at_start_up(tmp_path, capfd, checkpoint_dir, change,
                                                                       expected):
    """Found before any worker starts (in-process through the CLI's entry point: no subprocess needed)."""
    run_dir = tmp_path / "run"
    sets = [x for a in change for x in ("--set", a)]
    code, err = main_in_process([*TINY, "--set", f"run_dir={run_dir}", "--set", f"checkpoint.dir={checkpoint_dir}",
                                 *sets], capfd)
    assert code == 3 and len(err) == 1 and expected in err[0], err
    assert err[0].startswith("meshweave: checkpoint error: checkpoint.dir: the newest checkpoint") and "resume: false" in err[0]
    assert_no_run_dir(run_dir)

# --- a worker fails ------------------------------------------------------------------------
@pytest.mark.parametrize("drill,status,expected", [
    pytest.param("build:rank=1", 1, "meshweave: rank 1 failed in build: InjectedFailure: injected build failure",
                 marks=pytest.mark.slow),
    pytest.param("data:rank=0", 3, "meshweave: rank 0 failed in data: data.path: injected data failure",
                 marks=pytest.mark.slow),
])  # a failing train step: the four-worker drill (test_failures_interrupts.py)
def test_failing_worker_is_one_line_with_its_log(tmp_path, drill, status, expected):
    run_dir = tmp_path / "run"
    run = Run(tmp_path, [*TINY, "--set", f"run_dir={run_dir}"], env={"MESHWEAVE_RAISE": drill})
    rank = int(drill.split("rank=")[1].split(":")[0])
    line = assert_clean_end(run, status, expected)
    assert line.endswith(f"(full traceback in {run_dir}/logs/rank{rank}.log)")
    assert_failed_run_dir(run_dir, rank)


@pytest.mark.slow  # not in the fast subset: a worker's failure end to end (seconds each)
def test_worker_that_dies_without_a_report_is_named(tmp_path):
    run_dir = tmp_path / "run"
    run = Run(tmp_path, [*TINY, "--set", f"run_dir={run_dir}"], env={"MESHWEAVE_FAULT": "crash:rank=1:step=1"})
    line = assert_clean_end(run, 1, "meshweave: rank 1 failed in train step 2: the process ")
    assert "without reporting an error (no traceback)" in line


@pytest.mark.slow  # not in the fast subset: a worker's failure end to end
def test_checkpoint_write_failure_is_a_filesystem_error(tmp_path):
    ckpt = tmp_path / "ck"
    run = Run(tmp_path, [*TINY, *LONG, "--set", f"run_dir={tmp_path}/run", "--set", f"checkpoint.dir={ckpt}",
                         "--set", "checkpoint.every_steps=1", "--set", "checkpoint.keep=1"])
    run.wait_for_step(1)
    for attempt in range(20):  # put a file where the checkpoints go, while saves keep coming
        try:
            ckpt.rename(tmp_path / f"ck.moved{attempt}")
            ckpt.write_text("a file where the checkpoints were\n")
            break
        except (IsADirectoryError, FileNotFoundError, FileExistsError):
            continue
    line = assert_clean_end(run, 3, "failed in checkpoint (at step")
    assert any(text in line for text in ("Not a directory", "No such file", "File exists")), line
