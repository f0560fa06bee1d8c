"""Training metrics: a one-line progress report on rank 0, per-rank JSONL, optional TensorBoard.

Throughput is global tokens per second; TFLOP/s is per device; MFU needs a known peak: from
`train.peak_tflops`, else a table of known accelerators, else it is reported as "n/a" (a
guessed peak makes MFU misleading).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

# Dense bf16 peak TFLOP/s per device (vendor datasheets), matched by substring of the device name.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0,
                    "L4": 121.0, "MI300X": 1307.0, "MI250X": 383.0}


def peak_tflops(configured: float | None, device_type: str) -> float | None:
    if configured is not None:
        return configured
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def peak_memory_gib(device_type: str) -> float:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class StepMetrics:
    """One step's figures; loss and grad_norm may be device tensors (read only on log steps)."""

    step: int
    loss: float | torch.Tensor
    grad_norm: float | torch.Tensor
    lr: float
    tokens: int  # global tokens in this step
    step_time: float


class MetricsLogger:
    def __init__(self, rank: int, world_size: int, total_steps: int, flops_per_token: float, peak: float | None,
                 device_type: str, every: int, jsonl_path: Path | None, tb_dir: Path | None,
                 stream: TextIO = sys.stdout) -> None:
        self.rank, self.world_size, self.total_steps = rank, world_size, total_steps
        self.flops_per_token, self.peak, self.device_type = flops_per_token, peak, device_type
        self.every, self.stream = every, stream
        self.start = time.perf_counter()
        self.window: list[StepMetrics] = []
        self.jsonl = None
        if jsonl_path is not None:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = jsonl_path.open("a")
        self.tb = _tensorboard_writer(tb_dir) if tb_dir is not None and rank == 0 else None

    def log(self, m: StepMetrics, first_step: int = 0) -> dict[str, Any] | None:
        self.window.append(m)
        if not (m.step % self.every == 0 or m.step == self.total_steps):
            return None
        record = self._summarise(m, first_step)
        self.window.clear()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.rank == 0:
            print(format_progress(record, self.total_steps), file=self.stream, flush=True)
            if self.tb is not None:
                for key in ("loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_device"):
                    self.tb.add_scalar(key, record[key], m.step)
        return record

    def _summarise(self, m: StepMetrics, first_step: int) -> dict[str, Any]:
        elapsed = sum(x.step_time for x in self.window)
        tokens = sum(x.tokens for x in self.window)
        tps = tokens / elapsed if elapsed > 0 else 0.0
        tflops = tps * self.flops_per_token / self.world_size / 1e12
        done = m.step - first_step
        eta = (time.perf_counter() - self.start) / max(1, done) * (self.total_steps - m.step)
        return {"step": m.step, "loss": float(m.loss), "grad_norm": float(m.grad_norm), "lr": m.lr, "tokens_per_s": tps,
                "tflops_per_device": tflops, "mfu": tflops / self.peak if self.peak else None,
                "peak_mem_gib": peak_memory_gib(self.device_type), "eta_s": eta, "rank": self.rank,
                "time": time.time()}

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def format_progress(r: dict[str, Any], total: int) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    eta = f"{int(r['eta_s'] // 60)}m{int(r['eta_s'] % 60):02d}s"
    return (f"step {r['step']:>{len(str(total))}}/{total} | loss {r['loss']:.4f} | grad {r['grad_norm']:.3f} | "
            f"lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s | {r['tflops_per_device']:.3f} TFLOP/s | "
            f"MFU {mfu} | mem {r['peak_mem_gib']:.2f} GiB | eta {eta}")


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("meshweave: logging.tensorboard is on but tensorboard is not installed (pip install tensorboard); "
              "continuing without it", file=sys.stderr)
        return None
    return SummaryWriter(str(directory))
