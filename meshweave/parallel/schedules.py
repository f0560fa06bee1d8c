"""Names of the pipeline schedules the config accepts, mapped to torch.distributed.pipelining classes.

Which ones exist depends on the installed torch; validation lists what is available here.
"""

from __future__ import annotations

import importlib

# config name -> (class name in torch.distributed.pipelining.schedules, needs virtual stages > 1 per rank)
SCHEDULE_CLASSES: dict[str, tuple[str, bool]] = {
    "gpipe": ("ScheduleGPipe", False),
    "1f1b": ("Schedule1F1B", False),
    "interleaved1f1b": ("ScheduleInterleaved1F1B", True),
    "loopedbfs": ("ScheduleLoopedBFS", True),
    "interleavedzerobubble": ("ScheduleInterleavedZeroBubble", True),
    "zbvzerobubble": ("ScheduleZBVZeroBubble", True),
    "dualpipev": ("ScheduleDualPipeV", True),
}


def available_schedules() -> list[str]:
    module = importlib.import_module("torch.distributed.pipelining.schedules")
    return [name for name, (cls, _) in SCHEDULE_CLASSES.items() if hasattr(module, cls)]


def schedule_class(name: str) -> type:
    module = importlib.import_module("torch.distributed.pipelining.schedules")
    return getattr(module, SCHEDULE_CLASSES[name][0])


def is_multi_stage(name: str) -> bool:
    """True for schedules that run several model chunks (virtual stages) per pipeline rank."""
    return SCHEDULE_CLASSES[name][1]


# Schedules whose two chunks per rank are placed in a "V": rank r holds stages r and 2*pp-1-r, so
# the first and the last stage share rank 0 (the others place chunk c of rank r at stage c*pp + r).
V_SCHEDULES = ("zbvzerobubble", "dualpipev")


def stage_style(name: str) -> str:
    """"v" for V-shaped stage placement, else "loop"."""
    return "v" if name in V_SCHEDULES else "loop"


def stage_ids_of_rank(rank: int, pp: int, virtual: int, style: str) -> list[int]:
    """Global stage indices run by pipeline rank `rank`, in chunk order."""
    if style == "v":
        if virtual != 2:
            raise ValueError(f"V-shaped schedules need exactly 2 stages per rank, got {virtual}")
        return [rank, 2 * pp - 1 - rank]
    return [c * pp + rank for c in range(virtual)]
