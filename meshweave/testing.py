"""Run a function on N gloo processes, reusing the workers across calls.

Starting a gloo group costs seconds (spawned interpreters import torch), so a `WorkerPool` starts
N workers once, joins them into one default process group, and then runs any number of tasks on
them. A task is a picklable module-level function; it runs on every rank and its return values
come back as a list indexed by rank.

Watchdog: if a rank fails, the other ranks get a short grace period (they may be blocked in a
collective the failed rank never joins); if the task outlives its timeout, the pool is torn down.
Either way the error lists every rank's traceback (or "still running", with a stack dump of the
hung ranks on stderr) and the pool is rebuilt on next use, so one failure never poisons the rest.

It lives in the package (not only in tests/) so that benchmarks and users' own tests can use it.
"""

from __future__ import annotations

import faulthandler
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

from meshweave.launch.env import free_port

_POOLS: dict[int, WorkerPool] = {}
FAILURE_GRACE_S = 10.0
# A safety net: tasks' groups are released after each task (`_release_task_groups`), but anything else a
# task leaves in a long-lived worker is bounded by replacing the pool now and then (a restart costs ~2 s).
RECYCLE_AFTER_TASKS = 50


class DistributedTestError(AssertionError):
    """A distributed task failed on some rank or hung past its watchdog."""


def _worker_main(rank: int, world: int, port: int, tasks: mp.Queue, results: mp.Queue, threads: int) -> None:
    import torch
    import torch.distributed as dist

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results.put(("ready", rank, None))
    while (task := tasks.get()) is not None:
        fn, args, kwargs = task
        try:
            results.put(("ok", rank, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - every failure must reach the parent
            results.put(("err", rank, traceback.format_exc()))
        finally:
            _release_task_groups()
    # Leave without destroy_process_group and the interpreter's teardown: they take seconds per worker
    # (closing a test session's pools took 21 s for 7 workers), and every result has been delivered.
    os._exit(0)


def _release_task_groups() -> None:
    """Destroy the process groups a task created (meshes, SP sub-groups) and the caches that name them.

    Every gloo group keeps threads and sockets alive: after 30 mesh tasks 4 idle workers held 1,465 threads
    and burned 3.2 CPU-s per 5 s doing nothing, which overloaded the 2-core machine during the suite. Every
    rank runs the same task, so every rank destroys the same groups here. DTensor caches its sharding and
    redistribution plans keyed by meshes whose equality ignores their groups, so a later task's equal mesh
    would find a plan naming a destroyed group: those caches are cleared too.
    """
    import gc

    import torch.distributed.distributed_c10d as c10d

    default = c10d._get_default_group()
    for pg in list(c10d._world.pg_map):
        if pg is not default:
            c10d.destroy_process_group(pg)
    gc.collect()
    _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    # The C++ dispatch fast path has its own cache; torch.distributed's Python caches are functools
    # lru_caches spread over modules and closures, so they are found by type rather than named one by one.
    import functools
    import gc

    import torch

    clear_fast_path = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_fast_path is not None:
        clear_fast_path()
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which deprecated torch objects warn about
        if type(obj) is functools._lru_cache_wrapper and (obj.__module__ or "").startswith("torch.distributed"):
            obj.cache_clear()


class WorkerPool:
    """N long-lived gloo workers that run tasks on demand."""

    def __init__(self, world_size: int, start_timeout: float = 120.0) -> None:
        self.world_size = world_size
        self.tasks_run = 0
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        threads = max(1, (os.cpu_count() or 1) // world_size)
        self._procs = [
            ctx.Process(target=_worker_main, args=(r, world_size, port, self._tasks[r], self._results, threads), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        ready = self._collect(start_timeout, "start-up", expect="ready")
        if any(kind != "ready" for kind, _ in ready.values()):
            self.close()
            raise DistributedTestError(f"worker pool of {world_size} failed to start: {ready}")

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 180.0, **kwargs: Any) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank; return per-rank results or raise with all tracebacks."""
        self.tasks_run += 1
        for q in self._tasks:
            q.put((fn, args, kwargs))
        outcome = self._collect(timeout, getattr(fn, "__name__", str(fn)))
        failed = {r: v for r, (kind, v) in outcome.items() if kind != "ok"}
        missing = [r for r in range(self.world_size) if r not in outcome]
        if failed or missing:
            self._dump_stacks(missing)
            self.close()
            raise DistributedTestError(_failure_report(fn, self.world_size, failed, missing, timeout))
        return [outcome[r][1] for r in range(self.world_size)]

    def _collect(self, timeout: float, what: str, expect: str = "ok") -> dict[int, tuple[str, Any]]:
        outcome: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(outcome) < self.world_size:
            if any(kind == "err" for kind, _ in outcome.values()):
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._dead_worker(outcome):
                break
            try:
                kind, rank, value = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            outcome[rank] = (kind, value)
        return outcome

    def _dead_worker(self, outcome: dict) -> bool:
        return any(not p.is_alive() and r not in outcome for r, p in enumerate(self._procs))

    def _dump_stacks(self, ranks: list[int]) -> None:
        for r in ranks:
            if self._procs[r].is_alive():
                os.kill(self._procs[r].pid, signal.SIGUSR1)
        time.sleep(0.5 if ranks else 0)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
        if _POOLS.get(self.world_size) is self:
            del _POOLS[self.world_size]


def _failure_report(fn: Callable, world: int, failed: dict[int, str], missing: list[int], timeout: float) -> str:
    lines = [f"distributed task {getattr(fn, '__name__', fn)!r} on {world} ranks failed"]
    if missing:
        lines.append(f"ranks still running after the watchdog ({timeout:.0f}s, or {FAILURE_GRACE_S:.0f}s after a "
                     f"failure) or dead: {missing} (stack dumps on stderr)")
    for rank in sorted(failed):
        lines.append(f"--- rank {rank} traceback ---\n{failed[rank]}")
    return "\n".join(lines)


def get_pool(world_size: int) -> WorkerPool:
    """The shared pool for this world size, (re)started if needed."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive() or pool.tasks_run >= RECYCLE_AFTER_TASKS:
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = WorkerPool(world_size)
    return pool


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0, **kwargs: Any) -> list[Any]:
    """Run `fn` on `world_size` gloo ranks (pooled workers); results indexed by rank."""
    return get_pool(world_size).run(fn, *args, timeout=timeout, **kwargs)


def close_all_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
