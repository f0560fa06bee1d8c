"""Pipeline bubbles per schedule, and TP/PP communication volume, measured with the real trainer.

1. Bubble: for each schedule on pp=2 CPU processes (one thread each, so the two stages really run
   in parallel on the two cores), the time each rank spends computing (stage forward, backward and
   weight-gradient calls, timed around torch's stage methods) is subtracted from the wall time of
   the schedule's step; idle / step is the measured bubble. Beside it the ideal-model figure of
   `meshweave plan` ((p-1)/(m+p-1) for GPipe/1F1B, (p-1)/(v*m+p-1) interleaved, a third of that
   for the zero-bubble schedules). Measured bubbles include P2P latency and unequal stage times
   (the last stage also runs the head and the loss), which the ideal model leaves out.
2. Volume: bytes per step in the ledger (measured by hooking DTensor's collectives and the
   pipeline's P2P ops) against the analytic formulas, for TP, PP and TP x PP layouts.

    python benchmarks/bench_pipeline.py [--quick] [--out benchmarks/results]

Markdown + JSON + PNG are written to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from meshweave.launch.plan import bubble_fraction
from meshweave.models.registry import model_spec
from meshweave.parallel.pipeline_split import split_layers
from meshweave.parallel.pipeline_comm import pipeline_p2p_bytes
from meshweave.parallel.tensor_parallel_comm import tensor_parallel_bytes
from meshweave.train.build import build_trainer
from meshweave.train.config import load_config
from meshweave.testing import close_all_pools, run_distributed

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved1f1b", 2), ("loopedbfs", 2), ("interleavedzerobubble", 2),
             ("zbvzerobubble", 2), ("dualpipev", 2)]
STAGE_COMPUTE = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")


def _config(overrides: list[str], run_dir: str, quick: bool):
    model = ["model.dim=128", "model.n_layers=4"] if quick else ["model.dim=256", "model.n_layers=8"]
    return load_config(None, [*model, "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=512",
                              "train.seq_len=128", "train.global_batch=8", "train.steps=100", f"run_dir={run_dir}",
                              "logging.jsonl=false", "logging.comm_accounting=true", "data.max_bytes=400000", *overrides])


def _time_stage_compute(stages: list, busy: list[float]) -> None:
    """Wrap each stage's compute methods so that their wall time is added to busy[0]."""
    for stage in stages:
        for name in STAGE_COMPUTE:
            method = getattr(stage, name)

            @functools.wraps(method)
            def timed(*args, _m=method, **kwargs):
                start = time.perf_counter()
                try:
                    return _m(*args, **kwargs)
                finally:
                    busy[0] += time.perf_counter() - start

            setattr(stage, name, timed)


def measure_bubble(overrides: list[str], steps: int, quick: bool) -> dict:
    """Per rank: median over steps of idle/step for the schedule's forward+backward."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(_config(overrides, run_dir, quick))
        p = trainer.p
        busy = [0.0]
        _time_stage_compute(p.runner.stages, busy)
        trainer.train_step()  # first step: torch's shape inference
        fractions, step_times = [], []
        for _ in range(steps):
            batch = p.dataset.batch(p.sampler.next_local_rows()).to(p.device)
            targets = trainer.global_target_count(batch)
            torch.distributed.barrier()
            busy[0] = 0.0
            start = time.perf_counter()
            p.runner.forward_backward(batch, targets)
            elapsed = time.perf_counter() - start
            fractions.append(1 - busy[0] / elapsed)
            step_times.append(elapsed)
            p.optimizer.zero_grad(set_to_none=True)
        p.mesh.close()
        return {"bubble": statistics.median(fractions), "step_s": statistics.median(step_times)}


def measure_volume(overrides: list[str], quick: bool) -> dict:
    """Ledger bytes of one (second) training step and what this rank's stages are."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _config(overrides, run_dir, quick)
        trainer = build_trainer(cfg)
        trainer.train_step()
        trainer.p.mesh.ledger.reset()
        trainer.train_step()
        stages = getattr(trainer.p.runner, "stages", [])
        out = {"ledger": trainer.p.mesh.ledger.snapshot(), "stage_ids": [s.stage_index for s in stages] or [0],
               "n_stages": stages[0].num_stages if stages else 1, "dim": cfg.model.dim,
               "tokens": cfg.train.global_batch * cfg.train.seq_len, "layers": split_layers(
                   model_spec(cfg.model.kind), cfg.model, cfg.train.seq_len, stages[0].num_stages if stages else 1, "even")}
        trainer.p.mesh.close()
        return out


def analytic_volume(res: dict, tp: int) -> dict[str, int]:
    ids, n = res["stage_ids"], res["n_stages"]
    out = {}
    if tp > 1:
        layers = sum(len(res["layers"][s]) for s in ids)
        tp_bytes = tensor_parallel_bytes(res["tokens"], res["dim"], tp, layers, 0 in ids, n - 1 in ids)
        out.update({f"tp/{k}": v for k, v in tp_bytes.items()})
    if n > 1:
        out.update({f"pp/{k}": v for k, v in pipeline_p2p_bytes(ids, n, res["tokens"], res["dim"], tp).items()})
    return out


def run(quick: bool) -> dict:
    m = 4
    steps = 3 if quick else 8
    bubbles = []
    for schedule, v in SCHEDULES:
        overrides = ["parallel.pp=2", f"parallel.pp_schedule={schedule}", f"parallel.virtual_stages={v}",
                     f"parallel.microbatches={m}"]
        ranks = run_distributed(measure_bubble, 2, overrides, steps, quick, timeout=600)
        bubbles.append({"schedule": schedule, "virtual": v, "microbatches": m,
                        "measured": [r["bubble"] for r in ranks], "step_s": max(r["step_s"] for r in ranks),
                        "ideal": bubble_fraction(schedule, 2, m, v)})
        print(f"{schedule:>22}: measured {bubbles[-1]['measured']}, ideal {bubbles[-1]['ideal']:.3f}", flush=True)
    volumes = []
    for name, world, tp, overrides in [
        ("tp=2", 2, 2, ["parallel.tp=2"]),
        ("pp=2 1f1b", 2, 1, ["parallel.pp=2", "parallel.microbatches=4"]),
        ("tp=2 x pp=2 interleaved", 4, 2, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=interleaved1f1b",
                                           "parallel.virtual_stages=2", "parallel.microbatches=4"]),
    ]:
        for rank, res in enumerate(run_distributed(measure_volume, world, overrides, quick, timeout=600)):
            measured = {k: v["bytes"] for k, v in res["ledger"].items()
                        if k.split("/")[0] in ("tp", "pp") and k != "pp/all_reduce"}
            volumes.append({"layout": name, "rank": rank, "measured": measured, "analytic": analytic_volume(res, tp)})
    close_all_pools()
    return {"bubbles": bubbles, "volumes": volumes, "quick": quick}


def to_markdown(result: dict) -> str:
    lines = ["# Pipeline bubbles and TP/PP communication volume", "",
             f"pp=2 CPU processes (1 thread each), m=4 microbatches, {'quick' if result['quick'] else 'full'} run. "
             "Measured bubble = 1 - (stage compute time) / (schedule step time), per rank; ideal = `meshweave plan`'s "
             "formula (equal stage times, no communication cost).", "",
             "| schedule | v | measured bubble rank 0 | rank 1 | ideal | step (s) |", "|---|---|---|---|---|---|"]
    for b in result["bubbles"]:
        lines.append(f"| {b['schedule']} | {b['virtual']} | {b['measured'][0]:.3f} | {b['measured'][1]:.3f} | "
                     f"{b['ideal']:.3f} | {b['step_s']:.3f} |")
    lines += ["", "Bytes per training step on each rank (payload this rank hands in; ledger vs formula):", "",
              "| layout | rank | traffic | measured bytes | analytic bytes | ratio |", "|---|---|---|---|---|---|"]
    for vol in result["volumes"]:
        for key in sorted(set(vol["measured"]) | set(vol["analytic"])):
            got, want = vol["measured"].get(key, 0), vol["analytic"].get(key, 0)
            ratio = f"{got / want:.3f}" if want else "-"
            lines.append(f"| {vol['layout']} | {vol['rank']} | {key} | {got:,} | {want:,} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [b["schedule"] for b in result["bubbles"]]
    x = range(len(names))
    ax1.bar([i - 0.2 for i in x], [statistics.mean(b["measured"]) for b in result["bubbles"]], 0.4, label="measured")
    ax1.bar([i + 0.2 for i in x], [b["ideal"] for b in result["bubbles"]], 0.4, label="ideal")
    ax1.set_xticks(list(x), names, rotation=30, ha="right")
    ax1.set_ylabel("bubble fraction (mean over ranks)")
    ax1.set_title("pp=2, m=4")
    ax1.legend()
    rows = [(f"{v['layout']} r{v['rank']}\n{k}", v["measured"].get(k, 0), v["analytic"].get(k, 0))
            for v in result["volumes"] if v["rank"] == 0 for k in sorted(set(v["measured"]) | set(v["analytic"]))]
    y = range(len(rows))
    ax2.barh([i - 0.2 for i in y], [r[1] / 2**20 for r in rows], 0.4, label="measured")
    ax2.barh([i + 0.2 for i in y], [r[2] / 2**20 for r in rows], 0.4, label="analytic")
    ax2.set_yticks(list(y), [r[0] for r in rows], fontsize=7)
    ax2.set_xlabel("MiB per step (rank 0)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer steps (~1 min)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args.quick)
    (out / "pipeline.json").write_text(json.dumps(result, indent=1))
    (out / "pipeline.md").write_text(to_markdown(result))
    plot(result, out / "pipeline.png")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
