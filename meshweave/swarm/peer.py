"""A SWARM peer: serves one stage at a time, for whatever microbatches the coordinator's plan routes to it.

Per attempt of a step: take part in any state transfer (a joining or moving peer receives its stage's
weights and AdamW state from a donor), run the forward of its microbatches in increasing order
(receiving activations from whichever peer of the previous stage served each), then their backward
in decreasing order, sum the stage's gradients with the other peers of the stage, vote, and apply
the optimizer step only when the coordinator commits. Sends never wait inside a phase, and forward
depends only on earlier stages and backward only on later ones, so any route table is deadlock-free.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

import torch

from meshweave.core.mesh import device_type_for
from meshweave.core.schema import Config
from meshweave.swarm import control as ctl
from meshweave.swarm import snapshots
from meshweave.swarm.dataplane import EpochGroups, StepAborted, TransferFailed, Waiter
from meshweave.swarm.faults import maybe_kill, slow_down
from meshweave.swarm.stage import TRANSFER_TAG, StageModel, StepData

STORE_ERRORS = (RuntimeError, OSError, ConnectionError)


def microbatch_tag(step: int, microbatches: int, m: int, backward: bool) -> int:
    return ((step % 2) * microbatches + m) * 2 + int(backward)


def peer_device(requested: str) -> torch.device:
    """The peer's compute device: its LOCAL_RANK's GPU when CUDA is used (one peer per GPU), else the CPU."""
    if device_type_for(requested) == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


class Heartbeat:
    """A thread that bumps hb/<id> every heartbeat_s on its own store connection."""

    def __init__(self, address: str, peer: int, every_s: float) -> None:
        self.address, self.peer, self.every_s = address, peer, every_s
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="swarm-heartbeat").start()

    def _run(self) -> None:
        store = None
        while not self.stop.is_set():
            try:
                store = store or ctl.connect(self.address, patience_s=3600)
                store.add(ctl.heartbeat_key(self.peer), 1)
            except STORE_ERRORS:
                store = None
            self.stop.wait(self.every_s)


class Peer:
    def __init__(self, cfg: Config, device: torch.device | None = None) -> None:
        self.cfg, self.ft = cfg, cfg.fault_tolerance
        self.device = device or peer_device(cfg.train.device)
        self.microbatches = self.ft.microbatches or cfg.train.global_batch
        self.data = StepData(cfg, self.microbatches)
        self.model: StageModel | None = None
        self.applied_step, self.pending_step = 0, None
        self.restored: int | None = None  # the restore (pause) this peer last loaded a snapshot for
        self.groups: EpochGroups | None = None
        self.retired: list[EpochGroups] = []  # old epochs' groups: never destroyed mid-wait
        self.store = ctl.connect(self.ft.coordinator, patience_s=self.ft.wait_for_peers_s)
        self.id = int(self.store.add(ctl.NEXT_PEER, 1)) - 1
        self._hello()
        self.heartbeat = Heartbeat(self.ft.coordinator, self.id, self.ft.heartbeat_s)

    def _hello(self) -> None:
        ctl.put(self.store, ctl.hello_key(self.id), {
            "pid": os.getpid(), "host": socket.gethostname(), "index": os.environ.get("MESHWEAVE_SWARM_INDEX"), "applied_step": self.applied_step,
            "pending_step": self.pending_step, "stage": None if self.model is None else self.model.stage})

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve plans until the coordinator says the run is done; return the exit status."""
        seen: Any = None
        while True:
            try:
                current = ctl.get(self.store, ctl.CURRENT)
                if current is None or current == seen:
                    time.sleep(0.02)
                    continue
                seen = current
                if current.get("done"):
                    return self._finish()
                plan = ctl.get(self.store, ctl.plan_key(current["round"]))
                if plan is not None and str(self.id) in plan["members"]:
                    self._attempt(plan)
            except STORE_ERRORS as err:
                if not self._reconnect(err):
                    return 1
                seen = None

    def _reconnect(self, err: BaseException) -> bool:
        """The coordinator went away: keep the weights, reconnect and say where this peer stands."""
        print(f"meshweave swarm: peer {self.id}: lost the coordinator ({str(err).splitlines()[0][:120]}); "
              "reconnecting", file=sys.stderr, flush=True)
        if self.groups is not None:
            self.retired.append(self.groups)
            self.groups = None
        try:
            self.store = ctl.connect(self.ft.coordinator, patience_s=self.ft.wait_for_peers_s)
        except ConnectionError as gone:
            print(f"meshweave swarm: peer {self.id}: {gone}", file=sys.stderr, flush=True)
            return False
        self._hello()
        return True

    def _finish(self) -> int:
        self.heartbeat.stop.set()
        if self.model is not None:
            out = os.path.join(self.cfg.run_dir, "swarm", "peers")
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, f"peer{self.id}.pt")
            torch.save({"stage": self.model.stage, "step": self.applied_step,
                        "params": {n: p.detach().cpu() for n, p in self.model.module.named_parameters()}}, path + ".tmp")
            os.replace(path + ".tmp", path)
        return 0

    # -- one attempt of a step --------------------------------------------------------------------------
    def _attempt(self, plan: dict[str, Any]) -> None:
        step = plan["step"]
        decision = ctl.decision_key(plan["round"])
        waiter = Waiter(lambda: self.store.check([decision]), self.ft.transfer_timeout_s)
        self._apply_pending(plan)
        try:
            self._groups_for(plan, waiter)
            self._transfers(plan, waiter)
            report = self._compute(plan, waiter)
            report.update(self._reduce(plan, waiter))
            self.pending_step = step
            ctl.put(self.store, ctl.vote_key(plan["round"], self.id), {"ok": True, **report})
        except StepAborted:
            self._discard()
            return
        except TransferFailed as err:
            self._discard()
            ctl.put(self.store, ctl.vote_key(plan["round"], self.id),
                    {"ok": False, "error": str(err), "suspects": err.suspects})
        self._await_decision(plan, decision)

    def _await_decision(self, plan: dict[str, Any], key: str) -> None:
        while not self.store.check([key]):
            time.sleep(0.01)
        outcome = ctl.get(self.store, key)
        if outcome["commit"] and self.pending_step == plan["step"]:
            maybe_kill("commit", plan["step"], plan["attempt"])
            self._apply(plan["step"], outcome["norm"])
            self._maybe_snapshot(plan)
        else:
            self._discard()

    def _apply(self, step: int, norm_hex: str) -> None:
        assert self.model is not None
        self.model.apply(step, float.fromhex(norm_hex))
        self.applied_step, self.pending_step = step + 1, None

    def _maybe_snapshot(self, plan: dict[str, Any]) -> None:
        every = self.ft.snapshot_every
        assert self.model is not None
        if every and self.applied_step % every == 0 and plan["snapshot_writers"].get(str(self.model.stage)) == self.id:
            snapshots.save(self.cfg.run_dir, self.model.stage, self.applied_step,
                           self.model.state_tensors(with_optimizer=True))

    def _restore(self, plan: dict[str, Any]) -> None:
        """Roll this peer's stage back to the snapshot the plan names (after a stage lost every peer)."""
        restore = plan.get("restore")
        if restore is None or self.restored == restore["id"]:
            return
        assert self.model is not None
        step = restore["step"]
        if step == 0:  # no snapshot yet: the seeded initial weights
            self.model = StageModel(self.cfg, self.model.stage, self.device)
        else:
            self.model.materialise_optimizer_state()
            saved = snapshots.load(self.cfg.run_dir, self.model.stage, step)
            with torch.no_grad():
                for tensor, value in zip(self.model.state_tensors(with_optimizer=True), saved, strict=True):
                    tensor.copy_(value.view_as(tensor))
        self.applied_step, self.pending_step, self.restored = step, None, restore["id"]

    def _apply_pending(self, plan: dict[str, Any]) -> None:
        """After a coordinator restart: apply the step it committed while this peer could not hear it; then
        clear the gradients either way."""
        commit = plan.get("apply")
        if commit and self.pending_step == commit["step"] and self.applied_step == commit["step"]:
            self._apply(commit["step"], commit["norm"])
        self._discard()  # every attempt starts from zero gradients (an interrupted one may have left some)

    def _discard(self) -> None:
        self.pending_step = None
        if self.model is not None:
            self.model.optimizer.zero_grad(set_to_none=True)

    def _groups_for(self, plan: dict[str, Any], waiter: Waiter) -> None:
        if self.groups is not None and self.groups.epoch == plan["epoch"]:
            return
        if self.groups is not None:
            self.retired.append(self.groups)
        members = sorted(int(p) for p in plan["members"])
        my_stage = plan["members"][str(self.id)]
        stage_members = [p for p in members if plan["members"][str(p)] == my_stage]
        self.groups = None
        # Each epoch's groups meet on a store client of their own: a group creation that waits for a member that
        # died holds its client's socket until the timeout, and on the shared client that wait would also hold
        # back the polling of the coordinator's decision (measured: an abort then took transfer_timeout_s).
        self.groups = waiter.call(lambda: EpochGroups(ctl.connect(self.ft.coordinator, self.ft.transfer_timeout_s),
                                                      plan["epoch"], members, stage_members, self.id,
                                                      self.ft.transfer_timeout_s, self.device),
                                  f"connecting epoch {plan['epoch']}'s groups")

    def _transfers(self, plan: dict[str, Any], waiter: Waiter) -> None:
        """Build this peer's stage if it changed; send or receive a stage's state for joining peers."""
        stage = plan["members"][str(self.id)]
        if self.model is None or self.model.stage != stage:
            self.model, self.applied_step, self.pending_step = StageModel(self.cfg, stage, self.device), 0, None
        self._restore(plan)
        for i, move in enumerate(plan["transfers"] if plan.get("restore") is None else []):
            with_optimizer = plan["step"] > 0
            if move["receiver"] == self.id:
                maybe_kill("join", plan["step"], plan["attempt"])
                if with_optimizer:
                    self.model.materialise_optimizer_state()
                for j, tensor in enumerate(self.model.state_tensors(with_optimizer)):
                    buffer = torch.empty_like(tensor)
                    waiter.wait(self.groups.recv(buffer, move["donor"], TRANSFER_TAG + 1024 * i + j),
                                f"stage {stage} state from peer {move['donor']}", move["donor"])
                    with torch.no_grad():
                        tensor.copy_(buffer.view_as(tensor))
                self.applied_step = plan["step"]
            elif move["donor"] == self.id:
                works = [self.groups.send(t, move["receiver"], TRANSFER_TAG + 1024 * i + j)
                         for j, t in enumerate(self.model.state_tensors(with_optimizer))]
                for work in works:
                    waiter.wait(work, f"stage {stage} state to peer {move['receiver']}", move["receiver"])
        if self.applied_step != plan["step"]:
            raise TransferFailed(f"peer {self.id} holds step {self.applied_step} of stage {stage}, the plan is at "
                                 f"step {plan['step']} and names no donor for it")

    def _compute(self, plan: dict[str, Any], waiter: Waiter) -> dict[str, Any]:
        """Forward of this peer's microbatches in increasing order, then backward in decreasing order."""
        assert self.model is not None and self.groups is not None
        model, groups, spec = self.model, self.groups, self.model.spec
        step, attempt, routes, s = plan["step"], plan["attempt"], plan["routes"], self.model.stage
        batch = self.data.at(step).to(self.device)
        targets = spec.count_targets(batch).double()
        mine = [m for m, route in enumerate(routes) if route[s] == self.id]
        kept, sends, losses, busy = {}, [], {}, 0.0
        for m in mine:
            mb = self.data.microbatch(batch, m)
            maybe_kill("forward", step, attempt)
            if model.first:
                x = mb.fields[spec.input_field]
            else:
                x = torch.empty(model.activation_shape(mb), dtype=model.params[0].dtype, device=self.device)
                waiter.wait(groups.recv(x, routes[m][s - 1], microbatch_tag(step, self.microbatches, m, False)),
                            f"activation of microbatch {m} from peer {routes[m][s - 1]}", routes[m][s - 1])
                x.requires_grad_(True)
            began = time.perf_counter()
            out = model.module(x, **model.kwargs(mb))
            if model.last:
                loss_sum = spec.loss_sum(out, mb.fields[spec.target_field])
                maybe_kill("backward", step, attempt)
                (loss_sum / targets).backward()
                losses[m] = float(loss_sum.detach().double()).hex()
                if not model.first:
                    sends.append((groups.send(x.grad, routes[m][s - 1], microbatch_tag(step, self.microbatches, m, True)),
                                  routes[m][s - 1], x))
            else:
                sent = out.detach()
                sends.append((groups.send(sent, routes[m][s + 1], microbatch_tag(step, self.microbatches, m, False)),
                              routes[m][s + 1], sent))
                kept[m] = (x, out)
            spent = time.perf_counter() - began
            slow_down(spent)
            busy += time.perf_counter() - began
        for m in reversed([m for m in mine if m in kept]):
            maybe_kill("backward", step, attempt)
            x, out = kept.pop(m)
            grad = torch.empty_like(out)
            waiter.wait(groups.recv(grad, routes[m][s + 1], microbatch_tag(step, self.microbatches, m, True)),
                        f"gradient of microbatch {m} from peer {routes[m][s + 1]}", routes[m][s + 1])
            began = time.perf_counter()
            out.backward(grad)
            if not model.first:
                sends.append((groups.send(x.grad, routes[m][s - 1], microbatch_tag(step, self.microbatches, m, True)),
                              routes[m][s - 1], x))
            spent = time.perf_counter() - began
            slow_down(spent)
            busy += time.perf_counter() - began
        for work, peer, _ in sends:
            waiter.wait(work, f"a send to peer {peer}", peer)
        return {"stage": s, "done": mine, "losses": losses, "targets": int(targets),
                "seconds_per_microbatch": busy / len(mine) if mine else None}

    def _reduce(self, plan: dict[str, Any], waiter: Waiter) -> dict[str, Any]:
        """Sum the stage's gradients over its peers; report their squared norm (for the global clip)."""
        assert self.model is not None and self.groups is not None
        maybe_kill("allreduce", plan["step"], plan["attempt"])
        flat = self.model.flat_grads()
        work = self.groups.stage_sum(flat)
        if work is not None:  # a failure names the stage's other peers: the coordinator checks which one died
            waiter.wait(work, f"stage {self.model.stage} gradient all-reduce", self.groups.stage_others())
        self.model.set_grads(flat)
        return {"squared_norm": float(flat.double().pow(2).sum()).hex()}
