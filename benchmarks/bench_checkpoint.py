"""Checkpointing every step, side by side in one run: training-loop stall and end-to-end step time.

Methods, all on the same model, optimizer and batches, each checkpointing after every optimizer step:
- none: no checkpointing (the reference step time);
- meshweave lazy: `Checkpointer(mode="lazy")` — copy overlaps the next forward/backward, waits only
  before the next optimizer step; DCP files + manifest + commit + retention in the background;
- meshweave sync: `Checkpointer(mode="sync")` — the same files written inline;
- torch.save: one synchronous `torch.save` of model + optimizer state dicts (no fsync);
- dcp.save: synchronous DCP save;
- dcp.async_save: DCP's thread-based async save (stages a CPU copy inside the call, writes in a
  thread; the previous save is awaited before the next one, as torchtitan does).

Stall = time the training thread spends inside checkpoint calls per checkpoint (for lazy: the
`after_optimizer_step` call plus any wait in `before_optimizer_step`). Step time = wall time of a
block of steps, including draining the last in-flight save at the block's end, divided by its steps
(so background writing, which competes for the same CPU cores, is charged to its method). Methods
run in interleaved rounds so that machine noise hits them alike; step time is the best round (noise
from other processes only adds time), stall the median over all checkpoints.

    python benchmarks/bench_checkpoint.py --quick     # about a minute
    python benchmarks/bench_checkpoint.py             # bigger model, more rounds

Writes benchmarks/results/checkpoint.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from meshweave.checkpoint import Checkpointer, CheckpointSettings, ModelState, OptimizerState  # noqa: E402
from meshweave.models.llama.config import LlamaConfig
from meshweave.models.llama.model import Transformer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
KEEP = 2


class Loop:
    """One model + optimizer trained with one checkpointing method; records step times and stalls."""

    def __init__(self, name: str, cfg: LlamaConfig, batch: int, seq: int, root: Path) -> None:
        torch.manual_seed(0)
        self.name, self.cfg, self.batch, self.seq = name, cfg, batch, seq
        self.model = Transformer(cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.dir = root / name.replace(" ", "_").replace(".", "_")
        self.step_no, self.block_step_s, self.stall_s = 0, [], []
        self.app_state = {"model": ModelState([self.model]), "optimizer": OptimizerState([self.model], [self.opt])}
        self.ckpt = None
        if name.startswith("meshweave"):
            mode = name.split()[1]
            writer = "process" if name.endswith("process") else "thread"
            settings = CheckpointSettings(dir=str(self.dir), every_steps=1, mode=mode, keep=KEEP, writer=writer)
            self.ckpt = Checkpointer(settings, None, 0, 1, replicated_keys=())
        self._pending = None  # dcp.async_save future

    def run_block(self, steps: int, record: bool) -> None:
        """`steps` steps, then the in-flight save is drained; the block's wall time per step is recorded,
        so that background work is charged to the method that caused it."""
        start = time.perf_counter()
        self.run(steps, record)
        self.drain()
        if record:
            self.block_step_s.append((time.perf_counter() - start) / steps)

    def run(self, steps: int, record: bool) -> None:
        for _ in range(steps):
            tokens = torch.randint(0, self.cfg.vocab_size, (self.batch, self.seq + 1))
            logits = self.model(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            stall = self._timed(self.ckpt.before_optimizer_step) if self.ckpt else 0.0
            self.opt.step()
            self.opt.zero_grad()
            self.step_no += 1
            stall += self._checkpoint()
            if record:
                self.stall_s.append(stall)

    def _checkpoint(self) -> float:
        if self.name == "none":
            return 0.0
        if self.ckpt is not None:
            return self._timed(self.ckpt.after_optimizer_step, self.step_no, self.app_state)
        return self._timed(BASELINES[self.name], self)

    @staticmethod
    def _timed(fn: Callable, *args) -> float:
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    def target(self) -> str:
        """A fresh per-step path; older ones beyond KEEP are removed (outside the timed region is not
        possible for every method, so removal is part of every baseline's cost, as in ours)."""
        path = self.dir / f"step_{self.step_no:06d}"
        old = self.dir / f"step_{self.step_no - KEEP:06d}"
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        return str(path)

    def drain(self) -> None:
        """Wait for background checkpoint work (lazy flush, async_save upload)."""
        if self.ckpt is not None:
            self.ckpt.wait()
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.drain()
        if self.ckpt is not None:
            self.ckpt.close()


def _torch_save(loop: Loop) -> None:
    torch.save({"model": loop.model.state_dict(), "optim": loop.opt.state_dict()}, loop.target())


def _dcp_save(loop: Loop) -> None:
    dcp.save(loop.app_state, checkpoint_id=loop.target())


def _dcp_async_save(loop: Loop) -> None:
    if loop._pending is not None:
        loop._pending.result()  # at most one in flight, like ours
    loop._pending = dcp.async_save(loop.app_state, checkpoint_id=loop.target())


BASELINES = {"torch.save": _torch_save, "dcp.save": _dcp_save, "dcp.async_save": _dcp_async_save}
METHODS = ["none", "meshweave lazy", "meshweave sync", "torch.save", "dcp.save", "dcp.async_save"]


def _init_single_process_group() -> None:
    """DCP's async_save needs a process group; one gloo rank on a file store keeps all methods alike."""
    store = tempfile.mktemp(prefix="mw_bench_store_")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


WRITER_METHODS = ["none", "meshweave lazy", "meshweave lazy process"]  # --writers: checkpoint.writer thread vs process


def measure(cfg: LlamaConfig, batch: int, seq: int, rounds: int, steps: int, root: Path,
            methods: list[str] = METHODS) -> list[dict]:
    loops = [Loop(name, cfg, batch, seq, root) for name in methods]
    for loop in loops:
        loop.run_block(2, record=False)  # warm-up: allocation of host buffers, first-save costs
    for r in range(rounds):
        for loop in loops:
            loop.run_block(steps, record=True)
        print(f"round {r + 1}/{rounds} done", flush=True)
    for loop in loops:
        loop.close()
    params = sum(p.numel() for p in loops[0].model.parameters())
    state_mb = params * 4 * 3 / 2**20  # fp32 weights + two AdamW moments
    return [{"method": loop.name, "step_ms": 1e3 * min(loop.block_step_s),
             "stall_ms": 1e3 * statistics.median(loop.stall_s), "params": params, "state_mb": state_mb}
            for loop in loops]


def add_writer_ratios(rows: list[dict]) -> None:
    base = next(r for r in rows if r["method"] == "none")
    thread = next(r for r in rows if r["method"] == "meshweave lazy")
    for r in rows:
        r["overhead_pct"] = 100 * (r["step_ms"] / base["step_ms"] - 1)
        r["step_vs_thread"] = r["step_ms"] / thread["step_ms"]
        r["stall_vs_thread"] = r["stall_ms"] / thread["stall_ms"] if thread["stall_ms"] > 0 and r["method"] != "none" else None


def write_writer_report(rows: list[dict], out: Path, setup: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Lazy checkpoint every step: disk writes in a thread vs a writer process (CPU, one process)", "", setup, "",
             "| method | step ms | overhead vs none | step / thread writer | stall ms / checkpoint | stall / thread writer |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        stall = "—" if r["stall_vs_thread"] is None else f"{r['stall_vs_thread']:.2f}"
        lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {r['overhead_pct']:+.1f}% | {r['step_vs_thread']:.3f} | "
                     f"{r['stall_ms']:.2f} | {stall} |")
    (out / "checkpoint_writer.md").write_text("\n".join(lines) + "\n")
    (out / "checkpoint_writer.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    print("\n".join(lines))


def measure_verify_load(cfg: LlamaConfig, root: Path, repeats: int) -> list[dict]:
    """Time `load_latest` of one saved checkpoint with checkpoint.verify true and false, interleaved."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 65))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    state = {"model": ModelState([model]), "optimizer": OptimizerState([model], [opt])}
    ckpt = Checkpointer(CheckpointSettings(dir=str(root), every_steps=1, keep=1), None, 0, 1, replicated_keys=())
    ckpt.after_optimizer_step(1, state)
    ckpt.close()
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for verify in (True, False):
            settings = CheckpointSettings(dir=str(root), every_steps=1, keep=1, verify=verify)
            loader = Checkpointer(settings, None, 0, 1, replicated_keys=())
            start = time.perf_counter()
            assert loader.load_latest(state) == 1
            times[verify].append(time.perf_counter() - start)
    rows = [{"verify": v, "load_s": min(t), "load_s_median": statistics.median(t), "checkpoint_mb": size / 2**20}
            for v, t in times.items()]
    for r in rows:
        r["vs_no_verify"] = r["load_s"] / rows[1]["load_s"]
    return rows


def add_ratios(rows: list[dict]) -> None:
    base = next(r for r in rows if r["method"] == "none")["step_ms"]
    ref_stall = next(r for r in rows if r["method"] == "torch.save")["stall_ms"]
    lazy_stall = next(r for r in rows if r["method"] == "meshweave lazy")["stall_ms"]
    for r in rows:
        r["overhead_pct"] = 100 * (r["step_ms"] / base - 1)
        r["stall_vs_torch_save"] = r["stall_ms"] / ref_stall if r["method"] != "none" else None
        r["stall_over_lazy"] = r["stall_ms"] / lazy_stall if lazy_stall > 0 and r["method"] != "none" else None


def write_report(rows: list[dict], out: Path, setup: str, name: str = "checkpoint") -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Checkpointing every step: training-loop stall and step time (CPU, one process)", "", setup, "",
             "| method | step ms | overhead vs none | stall ms / checkpoint | stall / torch.save stall | stall / lazy stall |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {r['overhead_pct']:+.1f}% | {r['stall_ms']:.2f} | "
                     f"{fmt(r['stall_vs_torch_save'], '.3f')} | {fmt(r['stall_over_lazy'], '.1f')}x |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    print("\n".join(lines))
    plot(rows, out / f"{name}.png")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    names = [r["method"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [r["stall_ms"] for r in rows], color="tab:red")
    a.set_yscale("symlog", linthresh=0.1)
    a.set_ylabel("training-loop stall per checkpoint (ms, symlog)")
    b.bar(names, [r["step_ms"] for r in rows], color="tab:blue")
    b.axhline(rows[0]["step_ms"], color="gray", linestyle="--", linewidth=1)
    b.set_ylabel("step time with a checkpoint every step (ms)")
    for ax in (a, b):
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.suptitle("Checkpoint every step: lazy vs synchronous and DCP baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small model, few rounds (about a minute)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of the training thread (default 1: on a shared 2-core machine two "
                             "OpenMP threads stall each other; the flush thread always uses one)")
    parser.add_argument("--large-state", action="store_true",
                        help="16k vocabulary: about 4x the state bytes with the same tensor count (torch.save's stall "
                             "grows with bytes, the lazy stall with the number of tensors); writes checkpoint_large.*")
    parser.add_argument("--writers", action="store_true",
                        help="checkpoint.writer thread vs process (none / lazy thread / lazy process); writes "
                             "checkpoint_writer.*")
    parser.add_argument("--verify-load", action="store_true",
                        help="time resuming one checkpoint with checkpoint.verify true vs false; writes checkpoint_verify.*")
    args = parser.parse_args()
    if args.verify_load:
        return verify_load_main(args)
    if args.large_state:
        cfg, batch, seq, rounds, steps = LlamaConfig(vocab_size=16384, dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                                                     ffn_hidden=688), 8, 256, 3, 4
    elif args.quick:
        cfg, batch, seq, rounds, steps = LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                                     ffn_hidden=344), 8, 512, 3, 4
    else:
        cfg, batch, seq, rounds, steps = LlamaConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                                                     ffn_hidden=688), 8, 256, 5, 6
    torch.set_num_threads(args.threads)
    _init_single_process_group()
    root = Path(tempfile.mkdtemp(prefix="mw_bench_ckpt_", dir=args.dir))
    load_before = os.getloadavg()[0]
    try:
        rows = measure(cfg, batch, seq, rounds, steps, root, WRITER_METHODS if args.writers else METHODS)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()
    if args.writers:
        add_writer_ratios(rows)
    else:
        add_ratios(rows)
    setup = (f"model dim={cfg.dim} layers={cfg.n_layers} vocab={cfg.vocab_size} ({rows[0]['params'] / 1e6:.2f} M params, "
             f"{rows[0]['state_mb']:.0f} MiB model+AdamW state), batch {batch}x{seq}, torch {torch.__version__}, "
             f"{os.cpu_count()} CPU cores, {args.threads} compute thread(s); {rounds} interleaved rounds x {steps} steps "
             f"(step time: best round; stall: median); keep={KEEP}; machine load average {load_before:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end")
    if args.writers:
        write_writer_report(rows, Path(args.out), setup)
    else:
        write_report(rows, Path(args.out), setup, "checkpoint_large" if args.large_state else "checkpoint")


def verify_load_main(args: argparse.Namespace) -> None:
    """Resume time with and without checksum verification, on a checkpoint of a few hundred MiB."""
    cfg = LlamaConfig(vocab_size=32768, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=1376)
    if args.quick:
        cfg = LlamaConfig(vocab_size=8192, dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_hidden=688)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="mw_bench_verify_", dir=args.dir))
    load_before = os.getloadavg()[0]
    try:
        rows = measure_verify_load(cfg, root, repeats=3 if args.quick else 5)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    setup = (f"one process, checkpoint of {rows[0]['checkpoint_mb']:.0f} MiB (model dim={cfg.dim} layers={cfg.n_layers} "
             f"vocab={cfg.vocab_size} + AdamW state), page cache warm (the same files loaded repeatedly, verify true "
             f"and false interleaved; best of the repeats); torch {torch.__version__}, {os.cpu_count()} CPU cores; "
             f"load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    lines = ["# Resume time with and without checksum verification (checkpoint.verify)", "", setup, "",
             "| checkpoint.verify | load s (best) | load s (median) | vs verify false |", "|---|---|---|---|"]
    lines += [f"| {str(r['verify']).lower()} | {r['load_s']:.3f} | {r['load_s_median']:.3f} | {r['vs_no_verify']:.2f}x |"
              for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint_verify.md").write_text("\n".join(lines) + "\n")
    (out / "checkpoint_verify.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
