"""GPU readiness check on ONE device: training throughput and MFU, kernel accuracy, lazy checkpointing.

Run on a single CUDA GPU (one process, world size 1; the script sets MASTER_ADDR/PORT itself and
uses NCCL on CUDA, gloo on CPU):

    python benchmarks/gpu_check.py                      # H200-sized model, 300 steps; a few minutes
    python benchmarks/gpu_check.py --steps 100 --dim 4096 --layers 4 --seq-len 4096 --batch 4
    python benchmarks/gpu_check.py --device cpu --quick  # the CPU twin the tests run (tiny sizes)

Sections (each printed, then summarised in one table, written to OUT.md and OUT.json):

1. training: the real trainer (`build_trainer`) on the default model kind with the sizes given
   (`--preset large` on CUDA by default: dim 2048, 8 layers, seq 2048, batch 8, so that MFU is
   meaningful on an H100/H200; `--preset default` is the config's default model), bf16 autocast on
   CUDA; loss at a few points, tokens/s and MFU against the device's dense bf16 peak
   (`meshweave.train.metrics.PEAK_BF16_TFLOPS`, model FLOPs from the model spec).
2. kernels: the local attention kernels every SP method is built from (`attention/local.py`:
   block_forward / block_backward) on the device in bf16 against the CPU `math` backend in fp64 on
   the same (bf16-rounded) inputs, for full, causal and dense-mask blocks: max errors of out, lse
   and dq/dk/dv. Backends: what `auto` picks on the device, flash_attn when importable, cuda_flash
   (torch's own flash SDPA op, `aten._scaled_dot_product_flash_attention`, which returns the
   logsumexp; what `auto` picks on CUDA without flash-attn) when torch and the GPU support it, math.
   Then the SP ops themselves (ulysses, ring, tokenring, usp over one-rank groups) on the device vs
   the same op on CPU in fp32 (causal, full, packed documents), with the local kernel backends that
   actually ran (counted per call); each row must have run on the backend `auto` is meant to pick.
3. checkpoint: the lazy checkpointer inside the trainer (CUDA: pinned host buffers and a side
   stream, see checkpoint/staging.py) for a few saves; the training-thread stall per save, and a
   reload into a fresh trainer that must be bitwise equal to the state that was saved.

Exit status: 0 when every check passes, 1 when one fails (the table says which), 2 on bad usage
(e.g. `--device cuda` without CUDA).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from meshweave.attention import block_backward, block_forward, build_attention_op, local  # noqa: E402
from meshweave.attention.local import _choose, _cuda_flash_supported, _has_flash_attn, pick_backend  # noqa: E402
from meshweave.attention.masks import CAUSAL, FULL  # noqa: E402
from meshweave.core.comm import single_process_group  # noqa: E402
from meshweave.launch.env import free_port  # noqa: E402
from meshweave.models.attention_api import AttentionMeta  # noqa: E402
from meshweave.models.registry import model_spec  # noqa: E402
from meshweave.train.build import build_trainer  # noqa: E402
from meshweave.train.config import load_config  # noqa: E402
from meshweave.train.metrics import PEAK_BF16_TFLOPS, peak_tflops  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check"

# Model sizes per preset: (dim, layers, heads, kv_heads, seq_len, batch). None = the config default.
PRESETS: dict[str, tuple[int | None, ...]] = {
    "default": (None, None, None, None, None, None),
    "large": (2048, 8, 16, 8, 2048, 8),  # ~0.4 B parameters, 16k tokens per step: MFU is meaningful
    "quick": (64, 2, 4, 2, 64, 4),  # CPU twin: seconds
}

# Pass criteria, relative to the reference's largest magnitude (lse: absolute, it is O(log S)).
# The inputs are rounded to bf16 before both runs, so these bound the kernels' own error only.
KERNEL_TOL = {"out": 2e-2, "lse": 2e-2, "dq": 5e-2, "dk": 5e-2, "dv": 5e-2}
SP_TOL = {"out": 3e-2, "dq": 5e-2, "dk": 5e-2, "dv": 5e-2}


# --- set-up -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps (the CPU test runs this)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model sizes: large (default on CUDA), default (the config's model), quick")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300; 8 with --quick)")
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None, help="SwiGLU hidden size (default ~8/3 dim)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 for large, else config)")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="training compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--document-masking", action="store_true",
                    help="mask attention per packed document (dense SDPA mask: no flash kernel in training)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known-device table)")
    ap.add_argument("--ckpt-saves", type=int, default=None, help="lazy checkpoints to take (default 4; 3 with --quick)")
    ap.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default 5; 2 with --quick)")
    ap.add_argument("--ckpt-dim", type=int, default=None, help="model width for the checkpoint section (default 1024)")
    ap.add_argument("--ckpt-layers", type=int, default=None, help="model depth for the checkpoint section (default 4)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("training", "kernels", "sp_ops", "checkpoint"))
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output path without suffix: writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    if args.preset is None:
        args.preset = "quick" if args.quick else ("large" if args.device == "cuda" else "default")
    if args.steps is None:
        args.steps = 8 if args.quick else 300
    if args.ckpt_saves is None:
        args.ckpt_saves = 3 if args.quick else 4
    if args.ckpt_every is None:
        args.ckpt_every = 2 if args.quick else 5
    return args


def require_device(device_type: str) -> None:
    """Exit with status 2 and a clear message when CUDA is asked for and absent."""
    if device_type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"gpu_check: --device cuda, but {why} (torch {torch.__version__}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
              "Run it on a machine with a CUDA GPU, or try the CPU twin: --device cpu --quick", file=sys.stderr)
        raise SystemExit(2)


def init_single_process_group(device_type: str) -> None:
    """World size 1 over localhost: NCCL on CUDA, gloo on CPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device_type == "cuda":
        torch.cuda.set_device(0)
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs = {"device_id": torch.device("cuda", 0)} if device_type == "cuda" else {}
    dist.init_process_group(backend, rank=0, world_size=1, timeout=timedelta(seconds=300), **kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a region; on CUDA measured with events on the current stream (after a sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = float("nan")

    def __enter__(self) -> Timer:
        sync(self.device)
        if self.device.type == "cuda":
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


# --- 1. training ------------------------------------------------------------------------------
def _ffn_hidden(dim: int) -> int:
    """SwiGLU hidden size ~8/3 dim, rounded up to a multiple of 64 (tensor-core friendly)."""
    return 64 * math.ceil(8 * dim / 3 / 64)


def model_overrides(args: argparse.Namespace, dim: int | None = None, layers: int | None = None) -> list[str]:
    """Config overrides for the model and batch sizes the arguments (or the preset) ask for.

    `dim`/`layers` override the arguments (the checkpoint section's own model). Heads default to
    head_dim 128 for a width the preset does not name, kv heads to half the heads, ffn to ~8/3 dim."""
    p_dim, p_layers, p_heads, p_kv, p_seq, p_batch = PRESETS[args.preset]
    explicit_dim = dim is None and args.dim is not None
    dim = dim or args.dim or p_dim
    if dim is not None and dim == p_dim and not args.heads:
        heads, kv = p_heads, args.kv_heads or p_kv
    else:
        heads = args.heads or (max(1, dim // 128) if dim else None)
        kv = args.kv_heads or (max(1, heads // 2) if heads else None)
    if heads and dim and dim % heads:
        raise SystemExit(f"gpu_check: model width {dim} is not divisible by {heads} heads; pass --heads")
    ffn = args.ffn if (args.ffn and (explicit_dim or dim == p_dim)) else (_ffn_hidden(dim) if dim else None)
    values = {"model.dim": dim, "model.n_layers": layers or args.layers or p_layers, "model.n_heads": heads,
              "model.n_kv_heads": kv, "model.ffn_hidden": ffn,
              "train.seq_len": args.seq_len or p_seq, "train.global_batch": args.batch or p_batch,
              "train.lr": args.lr or (1e-3 if args.preset == "large" else None)}
    return [f"{k}={v}" for k, v in values.items() if v is not None]


def base_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    # The default dp_mode: at world size 1 nothing is wrapped, and bf16 runs under autocast (parallel/compose.py).
    return [f"train.device={args.device}", f"train.dtype={args.dtype}", "parallel.dp=1",
            f"data.document_masking={'true' if args.document_masking else 'false'}", f"run_dir={run_dir}",
            "logging.jsonl=false", "data.max_bytes=8000000"]


def check_training(args: argparse.Namespace, device: torch.device, run_dir: str) -> dict[str, Any]:
    """Train `args.steps` steps with the real trainer; loss at a few points, tokens/s, TFLOP/s, MFU."""
    cfg = load_config(None, [*base_overrides(args, run_dir), f"train.steps={args.steps}", *model_overrides(args)])
    trainer = build_trainer(cfg)
    m, t = cfg.model, cfg.train
    spec = model_spec(m.kind)
    n_params = sum(p.numel() for part in trainer.p.model_parts for p in part.parameters())
    print(f"[training] {m.kind} dim={m.dim} layers={m.n_layers} heads={m.n_heads}/{m.n_kv_heads} ffn={m.ffn_hidden} "
          f"seq={t.seq_len} batch={t.global_batch} params={n_params / 1e6:.1f}M steps={t.steps} "
          f"compute={trainer.p.runner.autocast_dtype or next(trainer.p.model_parts[0].parameters()).dtype}", flush=True)
    warmup = min(10, max(1, t.steps // 5)) if t.steps > 1 else 0  # steps before the timed window
    print_at = sorted({1, warmup, *(round(t.steps * f) for f in (0.25, 0.5, 0.75)), t.steps} - {0})
    losses: dict[int, float] = {}

    def run(first: int, last: int) -> None:
        for step in range(first, last + 1):
            metrics = trainer.train_step()
            if step in print_at:  # the only host syncs inside the loop
                losses[step] = float(metrics.loss)
                print(f"[training] step {step:>5}/{t.steps}  loss {losses[step]:.4f}", flush=True)

    run(1, warmup)  # warm-up: allocator, cuBLAS/cuDNN heuristics, lazy inits
    with Timer(device) as timed:
        run(warmup + 1, t.steps)
    trainer.p.metrics.close()
    timed_steps = t.steps - warmup
    tokens_per_s = timed_steps * t.global_batch * t.seq_len / timed.seconds
    flops_per_token = spec.flops_per_token(m, t.seq_len)
    tflops = tokens_per_s * flops_per_token / 1e12
    peak = peak_tflops(args.peak_tflops, device.type)
    result = {
        "model": {"kind": m.kind, "dim": m.dim, "layers": m.n_layers, "heads": m.n_heads, "kv_heads": m.n_kv_heads,
                  "ffn_hidden": m.ffn_hidden, "vocab": m.vocab_size, "params": n_params},
        "seq_len": t.seq_len, "batch": t.global_batch, "steps": t.steps, "timed_steps": timed_steps,
        "compute_dtype": str(trainer.p.runner.autocast_dtype or next(trainer.p.model_parts[0].parameters()).dtype),
        "document_masking": args.document_masking, "sdpa_kernels": sdpa_kernels(device, cfg),
        "losses": {str(k): v for k, v in losses.items()},
        "step_ms": 1e3 * timed.seconds / timed_steps, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token, "tflops": tflops, "peak_tflops": peak,
        "mfu": tflops / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    first, last = losses[min(losses)], losses[max(losses)]
    result["checks"] = {"loss finite": all(math.isfinite(v) for v in losses.values())}
    if t.steps >= 50:
        result["checks"]["loss decreased"] = last < first
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (unknown peak: --peak-tflops)"
    print(f"[training] {tokens_per_s:,.0f} tokens/s  {result['step_ms']:.1f} ms/step  {tflops:.1f} TFLOP/s  MFU {mfu}",
          flush=True)
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next sections build their own models
    return result


def sdpa_kernels(device: torch.device, cfg: Any) -> list[str] | str:
    """Which torch SDPA kernels accept the training's attention call (the model's single-process op)."""
    if device.type != "cuda":
        return "cpu"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m, t = cfg.model, cfg.train
    q = torch.randn(1, m.n_heads, min(t.seq_len, 1024), m.dim // m.n_heads, device=device, dtype=torch.bfloat16)
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=device).tril() if cfg.data.document_masking else None
    ok = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns why each refused kernel refused
                torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=mask is None)
            ok.append(backend.name.lower())
        except RuntimeError:
            pass
    return ok


# --- 2. kernels -------------------------------------------------------------------------------
def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return err.abs().max().item() / scale if scale > 0 else err.abs().max().item()


def _errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest error per tensor, relative to the reference's largest magnitude (lse: absolute, finite rows)."""
    out = {}
    for name, r in ref.items():
        g = got[name].detach().to("cpu", torch.float64)
        r = r.detach().to(torch.float64)
        if name == "lse":
            finite = torch.isfinite(r)
            out[name] = (g[finite] - r[finite]).abs().max().item() if finite.any() else 0.0
        else:
            out[name] = _rel(g - r, r)
    return out


def _document_mask(batch: int, seq: int, fractions: list[list[float]]) -> torch.Tensor:
    """(B, 1, S, S) causal mask within packed documents whose lengths are the given fractions of S."""
    ids = document_ids(batch, seq, fractions)
    same = ids[:, :, None] == ids[:, None, :]
    return (same & torch.ones(seq, seq, dtype=torch.bool).tril())[:, None]


def document_ids(batch: int, seq: int, fractions: list[list[float]]) -> torch.Tensor:
    rows = []
    for b in range(batch):
        fr = fractions[b % len(fractions)]
        cuts = [round(seq * sum(fr[:i + 1])) for i in range(len(fr) - 1)]
        lengths = [z - a for a, z in zip([0, *cuts], [*cuts, seq])]
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


DOC_FRACTIONS = [[0.3, 0.45, 0.25], [0.1, 0.9]]


def kernel_sizes(quick: bool) -> tuple[int, int, int, int, int]:
    """(B, H, H_kv, S, D) of the blocks checked."""
    return (2, 4, 2, 64, 32) if quick else (2, 8, 4, 1024, 128)


def _block_inputs(b: int, h: int, hkv: int, s: int, d: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (b, h, s, d), "k": (b, hkv, s, d), "v": (b, hkv, s, d), "dout": (b, h, s, d)}
    return {n: torch.randn(*shape, generator=g).to(dtype) for n, shape in shapes.items()}


def _run_block(x: dict[str, torch.Tensor], mask: Any, scale: float, backend: str) -> dict[str, torch.Tensor]:
    out, lse = block_forward(x["q"], x["k"], x["v"], mask, scale, backend)
    dq, dk, dv = block_backward(x["dout"], x["q"], x["k"], x["v"], out, lse, mask, scale, backend)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def check_kernels(quick: bool, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """Local block kernels on `device` in `dtype` vs the CPU math backend in fp64 (same rounded inputs)."""
    b, h, hkv, s, d = kernel_sizes(quick)
    scale = d ** -0.5
    inputs = _block_inputs(b, h, hkv, s, d, dtype)
    masks = {"full": FULL, "causal": CAUSAL, "dense mask": _document_mask(b, s, DOC_FRACTIONS)}
    on_device = {n: t.to(device) for n, t in inputs.items()}
    reference = {n: t.to(torch.float64) for n, t in inputs.items()}
    backends = ["auto"]
    if device.type == "cuda" and _has_flash_attn():
        backends.append("flash_attn")
    if device.type == "cuda" and _cuda_flash_supported(device):
        backends.append("cuda_flash")
    backends.append("math")
    rows = []
    for kind, mask in masks.items():
        ref = _run_block(reference, mask, scale, "math")
        dev_mask = mask.to(device) if isinstance(mask, torch.Tensor) else mask
        for backend in backends:
            row = {"backend": backend, "mask": kind, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                   "shape": f"B={b} H={h} Hkv={hkv} S={s} D={d}"}
            if backend == "auto":
                row["resolves_to"] = _choose("auto", on_device["q"], dev_mask)
            if isinstance(mask, torch.Tensor) and backend in ("flash_attn", "cuda_flash"):
                row.update(note="n/a: full/causal blocks only (auto uses another backend for dense masks)", ok=True)
                rows.append(row)
                continue
            try:
                got = _run_block(on_device, dev_mask, scale, backend)
                sync(device)
                row["errors"] = _errors(got, ref)
                row["ok"] = all(row["errors"][k] <= KERNEL_TOL[k] for k in row["errors"])
            except Exception as err:  # noqa: BLE001 - a failing backend is a finding, not a crash
                row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                row["ok"] = False
            rows.append(row)
            print(f"[kernels] {_kernel_line(row)}", flush=True)
    return rows


def _kernel_line(row: dict[str, Any]) -> str:
    name = row["backend"] + (f" -> {row['resolves_to']}" if "resolves_to" in row else "")
    if "errors" not in row:
        return f"{name:<40} {row['mask']:<10} {row.get('note', '')}"
    errs = "  ".join(f"{k} {v:.1e}" for k, v in row["errors"].items())
    return f"{name:<40} {row['mask']:<10} {errs}  {'ok' if row['ok'] else 'FAIL'}"


def sp_sizes(quick: bool) -> tuple[int, int, int, int, int]:
    """(B, S, H, H_kv, D) of the SP-op checks (model layout: B, S, H, D)."""
    return (2, 64, 4, 2, 32) if quick else (2, 2048, 8, 4, 128)


def sp_ops() -> dict[str, Any]:
    """Every SP method over one-rank groups (world size 1: the kernels and merging, no communication)."""
    ops = {m: build_attention_op(m, single_process_group("sp")) for m in ("ulysses", "ring", "tokenring")}
    ops["usp"] = build_attention_op("usp", ulysses_group=single_process_group("sp_ulysses"),
                                    ring_group=single_process_group("sp_ring"))
    return ops


def _run_op(op: Any, x: dict[str, torch.Tensor], causal: bool, docs: torch.Tensor | None) -> dict[str, torch.Tensor]:
    q, k, v = (x[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))
    out = op(q, k, v, AttentionMeta(document_ids=docs, causal=causal))
    out.backward(x["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@contextmanager
def backends_used() -> Iterator[Counter]:
    """Count, per local kernel call, the backend it resolved to (wraps local._choose while open)."""
    seen: Counter = Counter()
    original = local._choose

    def spy(backend: str, q: torch.Tensor, mask: Any) -> str:
        chosen = original(backend, q, mask)
        seen[chosen] += 1
        return chosen

    local._choose = spy
    try:
        yield seen
    finally:
        local._choose = original


def expected_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """What `auto` should run for full/causal blocks on this device (the SP checks' document plans need no dense
    mask: a few documents per row become full/causal calls)."""
    on_cuda = device.type == "cuda"
    return pick_backend(device.type, dtype, head_dim, False, flash_attn=on_cuda and _has_flash_attn(),
                        cuda_flash=on_cuda and _cuda_flash_supported(device))


def check_sp_ops(quick: bool, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """Each SP op on `device` in `dtype` vs the same op on CPU in fp32 from the same rounded inputs; records
    which local kernel backends ran on the device, and fails a row that did not run on the expected one."""
    b, s, h, hkv, d = sp_sizes(quick)
    expected = expected_backend(device, dtype, d)
    g = torch.Generator().manual_seed(1)
    shapes = {"q": (b, s, h, d), "k": (b, s, hkv, d), "v": (b, s, hkv, d), "dout": (b, s, h, d)}
    rounded = {n: torch.randn(*shape, generator=g).to(dtype) for n, shape in shapes.items()}
    on_device = {n: t.to(device) for n, t in rounded.items()}
    reference = {n: t.float() for n, t in rounded.items()}
    docs = document_ids(b, s, DOC_FRACTIONS)
    cases = {"causal": (True, None), "full": (False, None), "documents": (True, docs)}
    rows = []
    for method, op in sp_ops().items():
        for case, (causal, ids) in cases.items():
            row = {"method": method, "case": case, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                   "shape": f"B={b} S={s} H={h} Hkv={hkv} D={d}"}
            try:
                ref = _run_op(op, reference, causal, ids)
                with backends_used() as seen:
                    got = _run_op(op, on_device, causal, ids.to(device) if ids is not None else None)
                sync(device)
                row["backends"], row["expected_backend"] = dict(seen), expected
                row["errors"] = _errors(got, ref)
                row["ok"] = set(seen) == {expected} and all(row["errors"][k] <= SP_TOL[k] for k in row["errors"])
            except Exception as err:  # noqa: BLE001
                row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                row["ok"] = False
            rows.append(row)
            errs = "  ".join(f"{k} {v:.1e}" for k, v in row.get("errors", {}).items())
            print(f"[sp_ops]  {method:<10} {case:<10} {errs or row.get('note')}  kernels {_backend_counts(row)}  "
                  f"{'ok' if row['ok'] else 'FAIL'}", flush=True)
    return rows


def _backend_counts(row: dict[str, Any]) -> str:
    """'cuda_flash x6' (calls per backend that ran), or '-' when the op did not run."""
    return ", ".join(f"{k} x{n}" for k, n in sorted(row.get("backends", {}).items())) or "-"


# --- 3. checkpoint ----------------------------------------------------------------------------
def check_checkpoint(args: argparse.Namespace, device: torch.device, run_dir: str) -> dict[str, Any]:
    """Lazy checkpoints inside the trainer; stall per save; a reload must equal the saved state bitwise."""
    ckpt_dir = str(Path(run_dir) / "ckpt")
    steps = args.ckpt_saves * args.ckpt_every
    dim = None if args.quick else (args.ckpt_dim or 1024)
    layers = None if args.quick else (args.ckpt_layers or 4)
    sizes = model_overrides(args, dim, layers)
    if not args.quick:  # the save cost is in the state, not the sequence: keep the steps short
        sizes += [f"train.seq_len={min(1024, args.seq_len or 1024)}", f"train.global_batch={min(4, args.batch or 4)}"]
    overrides = [*base_overrides(args, run_dir), *sizes, f"train.steps={steps}", f"checkpoint.dir={ckpt_dir}",
                 f"checkpoint.every_steps={args.ckpt_every}", "checkpoint.mode=lazy", "checkpoint.keep=2"]
    cfg = load_config(None, overrides)
    saver = build_trainer(cfg)
    ckpt = saver.p.checkpointer
    print(f"[checkpoint] dim={cfg.model.dim} layers={cfg.model.n_layers}: {args.ckpt_saves} lazy saves every "
          f"{args.ckpt_every} steps", flush=True)
    step_s = []
    for _ in range(steps):
        with Timer(device) as timer:  # a sync per step: per-step times, so save steps can be told apart
            saver.train_step()
        step_s.append(timer.seconds)
    with Timer(device) as drain:
        ckpt.close()
    stats = ckpt.stats
    state_bytes = ckpt.snapshot.allocated_bytes  # host buffers: one per saved tensor
    saved = {k: v.detach().clone() for k, v in _named_state(saver).items()}
    saver.p.metrics.close()
    loader = build_trainer(cfg)
    loaded_step = loader.p.checkpointer.load_latest(loader.p.app_state)
    mismatched = [k for k, v in _named_state(loader).items() if k not in saved or not _bitwise_equal(v, saved[k])]
    missing = sorted(set(saved) - set(_named_state(loader)))
    loader.p.checkpointer.close()
    loader.p.metrics.close()
    save_steps = {args.ckpt_every * i for i in range(1, args.ckpt_saves + 1)}
    plain = [t for i, t in enumerate(step_s, 1) if i not in save_steps and i - 1 not in save_steps and i > 1]
    result = {
        "host_buffers": "pinned, side stream" if device.type == "cuda" else "pageable, background thread (CPU twin)",
        "model": {"dim": cfg.model.dim, "layers": cfg.model.n_layers}, "state_mib": state_bytes / 2**20,
        "saves": stats.started, "committed": stats.committed, "failed": stats.failed,
        "stall_after_ms": [1e3 * s for s in stats.stall_after_s], "stall_before_ms": [1e3 * s for s in stats.stall_before_s],
        "stall_per_save_ms": 1e3 * (sum(stats.stall_after_s) + sum(stats.stall_before_s)) / max(1, stats.started),
        "step_ms_plain": 1e3 * statistics.median(plain) if plain else None,
        "step_ms_save": 1e3 * statistics.median(step_s[i - 1] for i in save_steps),
        "step_ms_after_save": 1e3 * statistics.median(step_s[i] for i in save_steps if i < steps) if steps > args.ckpt_every else None,
        "final_drain_ms": 1e3 * drain.seconds,
        "reloaded_step": loaded_step, "saved_step": saver.step, "tensors_compared": len(saved),
        "mismatched": mismatched[:10] + missing[:10],
    }
    result["checks"] = {"all saves committed": stats.committed == stats.started == args.ckpt_saves and stats.failed == 0,
                        "reload bitwise equal": not mismatched and not missing and loaded_step == saver.step}
    print(f"[checkpoint] stall per save {result['stall_per_save_ms']:.2f} ms (after_optimizer_step "
          f"{', '.join(f'{x:.2f}' for x in result['stall_after_ms'])} ms; waits before the optimizer step "
          f"{', '.join(f'{x:.2f}' for x in result['stall_before_ms']) or 'none'}); reload of step {loaded_step}: "
          f"{len(saved)} tensors {'bitwise equal' if result['checks']['reload bitwise equal'] else 'DIFFER'}", flush=True)
    return result


def _named_state(trainer: Any) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint restores: model parameters/buffers and optimizer state, by name."""
    out = {}
    for i, part in enumerate(trainer.p.model_parts):
        out.update({f"model{i}.{k}": v for k, v in part.state_dict().items()})
    names = {id(p): n for i, part in enumerate(trainer.p.model_parts) for n, p in part.named_parameters()}
    for param, state in trainer.p.optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{names.get(id(param), id(param))}.{key}"] = value
    return out


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = (t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (a, b))  # bits, not values (NaN, -0.0)
    return torch.equal(a, b)


# --- report -----------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
           "flash_attn_importable": _has_flash_attn(), "load_avg": list(os.getloadavg()),
           "cuda_flash_available": device.type == "cuda" and _cuda_flash_supported(device)}
    if device.type == "cuda":
        env["peak_bf16_tflops_table"] = next((f"{k}: {v}" for k, v in PEAK_BF16_TFLOPS.items()
                                             if k in env["device"]), "not in table")
    return env


def run_section(name: str, fn: Callable[[], Any], summary: dict[str, Any], device: torch.device) -> None:
    """Run one section; a crash is recorded (and fails the check) but the other sections still run."""
    start = time.perf_counter()
    print(f"=== {name} ===", flush=True)
    try:
        summary[name] = fn()
    except Exception as err:  # noqa: BLE001 - report every section, whatever one of them does
        traceback.print_exc()
        summary.setdefault("errors", {})[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finally:
        summary.setdefault("section_s", {})[name] = time.perf_counter() - start


def all_checks(summary: dict[str, Any]) -> dict[str, bool]:
    checks = {f"{name}: ran ({error})": False for name, error in summary.get("errors", {}).items()}
    for name in ("training", "checkpoint"):
        for k, v in summary.get(name, {}).get("checks", {}).items():
            checks[f"{name}: {k}"] = bool(v)
    for name, key in (("kernels", "backend"), ("sp_ops", "method")):
        rows = summary.get(name, [])
        if rows:
            bad = [f"{r[key]}/{r.get('mask', r.get('case'))}" for r in rows if not r["ok"]]
            checks[f"{name}: all within tolerance" + (f" (failed: {', '.join(bad)})" if bad else "")] = not bad
    return checks


def markdown(summary: dict[str, Any]) -> str:
    env, lines = summary["environment"], []
    lines += ["# meshweave GPU readiness check", "",
              f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), flash-attn "
              f"{'installed' if env['flash_attn_importable'] else 'not installed'}, torch CUDA flash op "
              f"{'available' if env.get('cuda_flash_available') else 'not available'}; load average "
              f"{'/'.join(f'{x:.1f}' for x in env['load_avg'])}; total {summary['total_s']:.0f} s. "
              f"Command: `{summary['command']}`", "",
              "| check | result |", "|---|---|"]
    lines += [f"| {k} | {'pass' if v else '**FAIL**'} |" for k, v in summary["checks"].items()]
    if "training" in summary:
        t = summary["training"]
        m = t["model"]
        mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "n/a (unknown peak)"
        loss = ", ".join(f"{k}: {v:.3f}" for k, v in t["losses"].items())
        lines += ["", "## Training (real trainer, one device)", "", "| quantity | value |", "|---|---|",
                  f"| model | dim {m['dim']}, {m['layers']} layers, {m['heads']}/{m['kv_heads']} heads, ffn {m['ffn_hidden']}, "
                  f"{m['params'] / 1e6:.1f} M params |",
                  f"| tokens per step | {t['batch']} x {t['seq_len']} |", f"| compute dtype | {t['compute_dtype']} |",
                  f"| attention | SDPA, document masking {'on' if t['document_masking'] else 'off'}; kernels that accept "
                  f"the call: {t['sdpa_kernels']} |",
                  f"| loss (step: value) | {loss} |", f"| step time | {t['step_ms']:.1f} ms (mean of {t['timed_steps']} steps) |",
                  f"| tokens/s | {t['tokens_per_s']:,.0f} |", f"| model TFLOP/s | {t['tflops']:.1f} |",
                  f"| MFU | {mfu}" + (f" (peak {t['peak_tflops']:g} TFLOP/s) |" if t["peak_tflops"] else " |")]
        if t["peak_mem_gib"] is not None:
            lines.append(f"| peak memory | {t['peak_mem_gib']:.1f} GiB |")
    if summary.get("kernels"):
        lines += ["", "## Local attention kernels vs CPU fp64 math (same bf16-rounded inputs)", "",
                  f"{summary['kernels'][0]['shape']}, {summary['kernels'][0]['dtype']} on {summary['kernels'][0]['device']}. "
                  "Errors: max |diff| / max |ref| (lse: max |diff|).", "",
                  "| backend | mask | out | lse | dq | dk | dv | ok |", "|---|---|---|---|---|---|---|---|"]
        for r in summary["kernels"]:
            name = r["backend"] + (f" → {r['resolves_to']}" if "resolves_to" in r else "")
            if "errors" in r:
                e = r["errors"]
                lines.append(f"| {name} | {r['mask']} | " + " | ".join(f"{e[k]:.1e}" for k in ("out", "lse", "dq", "dk", "dv"))
                             + f" | {'yes' if r['ok'] else '**no**'} |")
            else:
                lines.append(f"| {name} | {r['mask']} | {r.get('note', '')} | | | | | {'yes' if r['ok'] else '**no**'} |")
    if summary.get("sp_ops"):
        r0 = summary["sp_ops"][0]
        lines += ["", "## Sequence-parallel ops (one-rank groups) vs the same op on CPU fp32", "",
                  f"{r0['shape']}, {r0['dtype']} on {r0['device']}. Errors: max |diff| / max |ref|. Kernels: the "
                  f"local attention backends that ran on the device (calls, forward and backward); expected "
                  f"`{r0.get('expected_backend', '?')}`.", "",
                  "| method | case | out | dq | dk | dv | kernels | ok |", "|---|---|---|---|---|---|---|---|"]
        for r in summary["sp_ops"]:
            e = r.get("errors")
            cells = " | ".join(f"{e[k]:.1e}" for k in ("out", "dq", "dk", "dv")) if e else f"{r.get('note')} | | |"
            ok = "yes" if r["ok"] else "**no**"
            lines.append(f"| {r['method']} | {r['case']} | {cells} | {_backend_counts(r)} | {ok} |")
    if "checkpoint" in summary:
        c = summary["checkpoint"]
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs) + " ms" if xs else "none"  # noqa: E731
        lines += ["", "## Lazy checkpoint", "", "| quantity | value |", "|---|---|",
                  f"| host buffers | {c['host_buffers']} |",
                  f"| model / state | dim {c['model']['dim']}, {c['model']['layers']} layers; {c['state_mib']:.0f} MiB |",
                  f"| saves committed | {c['committed']}/{c['saves']} (failed {c['failed']}) |",
                  f"| stall per save | {c['stall_per_save_ms']:.2f} ms |",
                  f"| after_optimizer_step per save | {fmt(c['stall_after_ms'])} |",
                  f"| waits before optimizer step | {fmt(c['stall_before_ms'])} |",
                  f"| step time: plain / save step / next step | {_ms(c['step_ms_plain'])} / {_ms(c['step_ms_save'])} / "
                  f"{_ms(c['step_ms_after_save'])} ms |",
                  f"| final drain (close) | {c['final_drain_ms']:.0f} ms |",
                  f"| reload | step {c['reloaded_step']} (saved {c['saved_step']}), {c['tensors_compared']} tensors, "
                  f"{'bitwise equal' if c['checks']['reload bitwise equal'] else 'DIFFER: ' + ', '.join(c['mismatched'])} |"]
    lines += ["", "Section times: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["section_s"].items()), ""]
    return "\n".join(lines)


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def write_outputs(summary: dict[str, Any], out: str) -> tuple[Path, Path]:
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    md, js = base.with_name(base.name + ".md"), base.with_name(base.name + ".json")
    md.write_text(markdown(summary))
    js.write_text(json.dumps(summary, indent=1, default=str))
    return md, js


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_device(args.device)
    start = time.perf_counter()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    init_single_process_group(args.device)
    summary: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "environment": environment(device),
                               "args": vars(args)}
    print(f"gpu_check: {summary['environment']['device']}, torch {torch.__version__}, preset {args.preset}", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="meshweave-gpu-check-") as run_dir:
            sections = {
                "training": lambda: check_training(args, device, str(Path(run_dir) / "train")),
                "kernels": lambda: check_kernels(args.quick, device),
                "sp_ops": lambda: check_sp_ops(args.quick, device),
                "checkpoint": lambda: check_checkpoint(args, device, str(Path(run_dir) / "ckpt_run")),
            }
            for name, fn in sections.items():
                if name not in args.skip:
                    run_section(name, fn, summary, device)
    finally:
        dist.destroy_process_group()
    summary["total_s"] = time.perf_counter() - start
    summary["checks"] = all_checks(summary)
    summary["passed"] = all(summary["checks"].values())
    md, js = write_outputs(summary, args.out)
    print("\n" + markdown(summary))
    print(f"gpu_check: {'PASSED' if summary['passed'] else 'FAILED'} in {summary['total_s']:.0f} s; wrote {md} and {js}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
