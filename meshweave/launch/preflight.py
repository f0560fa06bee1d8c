"""What `meshweave train` checks after the config validates and before any worker starts.

- memory: the plan's per-rank estimate (`launch.plan.memory_per_rank`, worst pipeline stage) plus
  the dataset and the process itself, times the ranks on this machine, against the memory this
  machine has available (/proc/meminfo MemAvailable, capped by a cgroup limit). On GPU the model
  part is checked per device by each rank before it builds (`check_device_memory`).
- data: the corpus exists, is readable text and holds at least one row of train.seq_len tokens.
- checkpoint: when resuming, the newest checkpoint holds the model this config builds (same
  parameter names and shapes, read from its JSON metadata; nothing is loaded).

A problem is one line: memory is a ConfigError (exit 2), data and checkpoint problems are
DataError / CheckpointMismatch (exit 3). MESHWEAVE_SKIP_MEMORY_CHECK=1 skips the memory check
(the estimate is analytic, not a measurement).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from meshweave.core.config import _short
from meshweave.core.dims import ParallelDims
from meshweave.core.errors import ConfigError
from meshweave.core.schema import Config, UnsetDirectoryVariable
from meshweave.launch.plan import GIB, worst_memory

PROCESS_BYTES = 400 * 2**20  # a rank's own footprint before any tensor (interpreter, torch, gloo), measured ~350 MiB
BYTES_PER_TOKEN = 40  # a rank's peak bytes per corpus token while it packs the dataset (int64 copies + index)
BYTES_PER_DOCUMENT = 256  # per synthetic document (one tensor object each)


class CheckpointMismatch(Exception):
    """The checkpoint a run would resume from holds another model (exit 3: the files, not the code)."""


def preflight(cfg: Config, world_size: int, local_ranks: int, device_type: str) -> None:
    """Every start-up check, cheapest first; raises on the first problem."""
    check_host_memory(cfg, world_size, local_ranks, device_type)
    check_corpus(cfg)
    check_checkpoint_fits(cfg)


# --- memory --------------------------------------------------------------------------------
def check_host_memory(cfg: Config, world_size: int, local_ranks: int, device_type: str) -> None:
    """ConfigError when the ranks on this machine need more host memory than it has available."""
    if os.environ.get("MESHWEAVE_SKIP_MEMORY_CHECK") == "1":
        return
    budget, source = available_host_memory()
    if budget is None:
        return
    model = worst_memory(cfg, ParallelDims.resolve(cfg.parallel, world_size)).total if device_type == "cpu" else 0.0
    data = dataset_bytes(cfg)
    per_rank = model + data + PROCESS_BYTES
    if per_rank * local_ranks > budget:
        on_host = f"{model / GIB:,.2f} GiB model state and activations (the plan's estimate), " if model else ""
        raise ConfigError(
            f"memory: {local_ranks} rank(s) on this machine need about {per_rank * local_ranks / GIB:,.1f} GiB "
            f"(each {on_host}{data / GIB:,.2f} GiB data, {PROCESS_BYTES / GIB:.2f} GiB process) but "
            f"{budget / GIB:,.1f} GiB is available ({source}); use a smaller model, train.seq_len, train.global_batch "
            f"or data.max_bytes, more ranks, or fewer local processes")


def check_device_memory(cfg: Config, world_size: int, local_rank: int) -> None:
    """On a GPU rank, before it builds: ConfigError when the plan's estimate exceeds the device's free memory."""
    import torch

    if os.environ.get("MESHWEAVE_SKIP_MEMORY_CHECK") == "1" or not torch.cuda.is_available():
        return
    free, _ = torch.cuda.mem_get_info(local_rank)
    need = worst_memory(cfg, ParallelDims.resolve(cfg.parallel, world_size)).total
    if need > free:
        raise ConfigError(f"memory: each rank needs about {need / GIB:,.2f} GiB on its GPU (the plan's estimate, worst "
                          f"stage) but cuda:{local_rank} has {free / GIB:,.2f} GiB free; use a smaller model, "
                          f"train.seq_len or train.global_batch, or shard more (parallel.tp, pp, dp with fsdp)")


def available_host_memory() -> tuple[float | None, str]:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup v2/v1 limit when one is set."""
    budget, source = None, ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                budget, source = float(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        return None, ""
    limit = _cgroup_room()
    if limit is not None and (budget is None or limit < budget):
        budget, source = limit, "this container's cgroup memory limit"
    return budget, source


def _cgroup_room() -> float | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:
                return None
            return float(int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def dataset_bytes(cfg: Config) -> float:
    """Upper estimate of a rank's memory for the packed corpus (every rank packs all of it)."""
    d = cfg.data
    if d.source == "synthetic":
        from meshweave.data.text import synthetic_count

        docs = synthetic_count(d.max_bytes, d.synthetic_mean_len)
        return docs * (min(d.synthetic_mean_len, d.synthetic_max_len) * BYTES_PER_TOKEN * 1.2 + BYTES_PER_DOCUMENT)
    return min(4 * d.max_bytes, _text_bytes_on_disk(cfg)) * BYTES_PER_TOKEN  # a character is at most 4 UTF-8 bytes


def _text_bytes_on_disk(cfg: Config) -> int:
    from meshweave.data.text import text_files

    if cfg.data.source == "builtin":
        files = list(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    else:
        files = text_files(cfg.data.path or "")
    total = 0
    for f in files:
        try:
            total += f.stat().st_size
        except OSError:
            continue  # read_documents names an unreadable file
        if total >= 4 * cfg.data.max_bytes:
            break
    return total


# --- data ----------------------------------------------------------------------------------
def check_corpus(cfg: Config) -> None:
    """DataError unless the corpus is readable text with at least one row of train.seq_len tokens."""
    from meshweave.data.text import corpus_tokens, require_rows

    d = cfg.data
    tokens = corpus_tokens(d.source, d.path, d.max_bytes, cfg.train.seed, d.synthetic_mean_len, d.synthetic_max_len)
    if d.packing:  # whole documents (packing: false) need no row length: any document of two tokens will do
        require_rows(tokens, cfg.train.seq_len)


# --- checkpoint ----------------------------------------------------------------------------
def check_checkpoint_fits(cfg: Config) -> None:
    """CheckpointMismatch when the newest committed checkpoint holds other parameter names or shapes."""
    c = cfg.checkpoint
    if not c.enabled or not c.resume:
        return
    newest = _newest_checkpoint(cfg)
    if newest is None:
        return
    saved = _saved_shapes(newest)
    if saved is None:
        return  # unreadable metadata: the loader verifies and falls back past it, with a warning
    problem = _shape_problem(saved, model_shapes(cfg))
    if problem:
        raise CheckpointMismatch(
            f"checkpoint.dir: the newest checkpoint {_short(newest)} holds a different model ({problem}); change the "
            f"model back, point checkpoint.dir at another directory, or set checkpoint.resume: false")


def _newest_checkpoint(cfg: Config) -> str | None:
    from meshweave.checkpoint.inspect import list_checkpoints

    c, found = cfg.checkpoint, []
    for level in c.disk_levels():
        if c.node_local and level == "local":
            continue  # each node's own copies: the ranks check them where they run
        try:
            directory = c.level_dir(level)
        except UnsetDirectoryVariable:
            continue  # a variable of the nodes (e.g. $SLURM_TMPDIR): the ranks report it if it is unset there
        if Path(directory).is_dir():
            found += [i for i in list_checkpoints(directory) if i.status == "committed"]
    return max(found, key=lambda i: i.step).path if found else None


def _saved_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    from meshweave.checkpoint import layout, storage

    try:
        md = storage.read_metadata_file(Path(path) / layout.DCP_METADATA)
    except (OSError, ValueError):
        return None
    prefix = "model/"
    return {k[len(prefix):]: tuple(v.size) for k, v in md.state_dict_metadata.items() if k.startswith(prefix)}


def model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the model this config builds (on the meta device: nothing allocated)."""
    import torch

    from meshweave.models.registry import model_spec

    with torch.device("meta"):
        model = model_spec(cfg.model.kind).build(cfg.model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _shape_problem(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    for name, shape in expected.items():
        if name in saved and saved[name] != shape:
            return f"{_short(name)} has shape {list(saved[name])} there but {list(shape)} in this config"
    missing = [n for n in expected if n not in saved]
    extra = [n for n in saved if n not in expected]
    if missing:
        return f"{len(missing)} tensor(s) of this model are not in it, e.g. {_short(missing[0])}"
    if extra:
        return f"it has {len(extra)} tensor(s) this model does not, e.g. {_short(extra[0])}"
    return None
