"""One torchft replica group (one process) training meshweave's model, for benchmarks/bench_swarm.py.

The replica builds the same model as `meshweave train` (same seed, so every replica starts from the
same weights and torchft's initial sync is skipped), takes its slice of each global batch from
meshweave's data sampler (replica r of R takes the r-th 1/R of the global batch, as a dp rank does),
and trains under torchft: a Manager (Gloo process group, min_replica_size=1) joined to the
lighthouse that the parent runs, torchft's DistributedDataParallel (its comm hook patched to survive a
failed allreduce, see _DDP) and OptimizerWrapper(AdamW).
A replica that starts late (or restarts after a failure) heals from a live replica's weights and
optimizer state and joins at its step.

Each committed step appends one JSON line {"step", "time", "participants", "loss"} to --timeline,
after a {"ready": ...} line once the manager has joined the lighthouse. With --start-file the replica
waits for that file before its first step (the parent creates it once every replica is ready, so
the first quorum holds them all).

    python benchmarks/torchft_replica.py --lighthouse http://host:port --replica-id 0 --replicas 2 \
        --steps 24 --timeline r0.jsonl [--start-file go] [--set model.dim=128 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torchft import DistributedDataParallel, Manager, ProcessGroupGloo
from torchft.optim import OptimizerWrapper

from meshweave.data.text import DistributedSampler, build_dataset
from meshweave.models.registry import model_spec
from meshweave.train.config import load_config
from meshweave.train.optim import build_optimizer, lr_factor


class ReplicaData:
    """This replica's slice of the global batch of each step (meshweave's sampler, replayed to any step)."""

    def __init__(self, cfg, replica: int, replicas: int) -> None:
        t, d = cfg.train, cfg.data
        self.dataset = build_dataset(d.source, d.path, d.max_bytes, t.seq_len, cfg.model.vocab_size, t.seed,
                                     d.synthetic_mean_len, d.synthetic_max_len, d.document_masking)
        self.sampler = DistributedSampler(len(self.dataset), t.global_batch, replica, replicas, t.seed)
        self.step, self.rows = -1, []

    def at(self, step: int):
        if step < self.step or self.step < 0:
            self.sampler.epoch, self.sampler.position, self.step = 0, 0, -1
        while self.step < step:
            self.rows, self.step = self.sampler.next_local_rows(), self.step + 1
        return self.dataset.batch(self.rows)


class _DDP(DistributedDataParallel):
    """torchft's DistributedDataParallel, with its comm hook surviving a failed allreduce.

    In torchft 0.2.0 the hook asserts when the allreduce of a bucket fails (a peer killed mid-step: the
    Gloo read error is caught by the work's wait(), which then never sets the future the hook returns),
    so the live replica would crash instead of skipping the step. The manager has recorded the error
    already and should_commit() refuses the step, so the hook hands back the (unused) local buffer.
    """

    @staticmethod
    def _comm_hook(state, bucket):  # no annotations: DDP checks them, and this file's are strings
        work = state.allreduce(bucket.buffer())
        work.wait()
        fut = getattr(work.get_future(), "_fut", None)
        if fut is None:  # failed, or skipped after an earlier failure of this step
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
        return fut


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lighthouse", required=True, help="address of the torchft LighthouseServer")
    parser.add_argument("--replica-id", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=2, help="replica groups the global batch is split over")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--timeline", required=True, help="JSON lines, one per committed step")
    parser.add_argument("--start-file", default=None, help="wait for this file before the first step")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="torchft's collective / RPC timeout")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()

    cfg = load_config(None, args.overrides)
    t = cfg.train
    spec = model_spec(cfg.model.kind)
    torch.manual_seed(t.seed)
    model = spec.build(cfg.model)
    data = ReplicaData(cfg, args.replica_id, args.replicas)
    timeline = Path(args.timeline)

    # This replica group's own store (one process per group: rank 0 of world size 1).
    store = dist.TCPStore(host_name="localhost", port=0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=args.timeout_s)

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])

    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), min_replica_size=1, load_state_dict=load_state_dict,
                      state_dict=state_dict, replica_id=str(args.replica_id), store_addr="localhost",
                      store_port=store.port, rank=0, world_size=1, lighthouse_addr=args.lighthouse,
                      timeout=timeout, quorum_timeout=timedelta(seconds=120), init_sync=False)
    ddp = _DDP(manager, model)
    optimizer = OptimizerWrapper(manager, build_optimizer([model], t, "cpu"))
    _append(timeline, {"ready": args.replica_id, "pid": os.getpid(), "time": time.time()})
    if args.start_file:
        while not os.path.exists(args.start_file):
            time.sleep(0.02)

    try:
        while manager.current_step() < args.steps:
            step = manager.current_step()
            for group in optimizer.param_groups:  # before the quorum, so a healing replica receives this step's lr
                group["lr"] = t.lr * lr_factor(step, t)
            batch = data.at(step)
            optimizer.zero_grad()  # starts the (asynchronous) quorum
            kwargs = {f: batch.fields[f] for f in spec.kwarg_fields if f in batch.fields}
            loss_sum = spec.loss_sum(ddp(batch.fields[spec.input_field], **kwargs), batch.fields[spec.target_field])
            (loss_sum / spec.count_targets(batch)).backward()  # DDP averages the gradients over the participants
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()  # steps AdamW only when every participant committed
            if manager.current_step() > step:
                _append(timeline, {"step": manager.current_step(), "time": time.time(),
                                   "participants": manager.num_participants(),
                                   "loss": float(loss_sum.detach()) / float(spec.count_targets(batch))})
    finally:
        manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
