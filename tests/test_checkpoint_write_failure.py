"""A background checkpoint write that fails on some ranks only fails the save on every rank at once.

Each case makes one local part of step 2's save (rank 0's preparation of the directory, a rank's plain
JSON file before DCP starts, a rank's checksums after DCP, rank 0's commit) raise an OSError on one rank
alone, in the order the drill of tests/test_failures.py hits by chance: the other rank is already in the
save's next collective when it fails. Every rank must then raise at its next call (the failed rank its
own error, the others a CheckpointWriteError naming it, both exit status 3), the group must still be
usable (nobody left inside a collective), and step 1 must stay the newest committed checkpoint. Before
the outcome of each local part was agreed, the healthy rank waited in that collective for a rank that
never came, while the failed rank's training loop waited for it: the drill's intermittent hang.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from meshweave.checkpoint import Checkpointer, layout, writer
from meshweave.testing import run_distributed
from tests.checkpoint_support import TinyRun, settings

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEP_2 = layout.tmp_dirname(2)
# point -> (rank that fails, module, function, when a call fails: its first argument and its number)
POINTS = {
    "prepare": (0, layout, "remove_stale_tmp", lambda path, n: n == 2),
    "plain_json": (1, writer, "_write_json", lambda path, n: STEP_2 in path),
    "checksums": (1, writer, "_describe", lambda path, n: STEP_2 in path and path.endswith(".distcp")),
    "commit": (0, layout, "write_manifest", lambda path, n: STEP_2 in path),
}


def _failing(original, when):  # noqa: ANN001, ANN202
    calls = []

    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if when(str(args[0]), len(calls)):
            raise NotADirectoryError(20, "Not a directory", str(args[0]))
        return original(*args, **kwargs)
    return fail


def _one_rank_fails_step_2(directory: str, point: str) -> dict:
    from meshweave.launch.errors import exit_status_for

    rank = dist.get_rank()
    fail_rank, module, name, when = POINTS[point]
    group = dist.new_group(backend="gloo")
    run = TinyRun(seed=0)
    ckpt = Checkpointer(settings(directory, every_steps=1), group, rank, dist.get_world_size())
    original = getattr(module, name)
    if rank == fail_rank:
        setattr(module, name, _failing(original, when))
    outcome = None
    try:
        run.step(ckpt)
        ckpt.wait()  # step 1 committed everywhere
        run.step(ckpt)  # step 2's save starts in the background; it fails on one rank
        try:
            ckpt.wait()
        except Exception as err:  # noqa: BLE001
            outcome = {"type": type(err).__name__, "message": str(err), "status": exit_status_for(err)}
    finally:
        setattr(module, name, original)
        ckpt.close()
    # nobody was left inside a collective of the checkpoint group: it still pairs up
    total = torch.tensor([1])
    dist.all_reduce(total, group=group)
    dist.destroy_process_group(group)
    return {"rank": rank, "outcome": outcome, "group_ok": int(total.item()) == 2,
            "committed": layout.committed_steps(directory), "latest": layout.read_pointer(directory)}


@pytest.mark.parametrize("point", sorted(POINTS))
def test_write_failing_on_one_rank_fails_the_save_on_every_rank(tmp_path, point):
    fail_rank = POINTS[point][0]
    results = run_distributed(_one_rank_fails_step_2, 2, str(tmp_path), point, timeout=120)
    for res in results:
        out = res["outcome"]
        assert out is not None, f"rank {res['rank']} did not learn that step 2's save failed"
        assert out["status"] == 3, out  # a filesystem error on every rank
        assert "Not a directory" in out["message"], out
        if res["rank"] == fail_rank:
            assert out["type"] == "NotADirectoryError", out
        else:
            assert out["type"] == "CheckpointWriteError" and f"failed on rank {fail_rank}" in out["message"], out
            assert "step 2" in out["message"], out
        assert res["group_ok"]
        assert res["committed"] == [1] and res["latest"] == 1, res
