"""A JSON codec for small plain state (ints, floats, strings, lists, tuples, dicts, tensors, arrays).

Checkpoints never unpickle anything read from disk, so the small state that DCP would pickle
(optimizer hyper-parameters, LR scheduler, RNG states, data position) is stored as JSON instead.
Tensors and numpy arrays become tagged objects holding dtype, shape and base64 bytes; tuples and
dicts with non-string keys are tagged too so that `decode(encode(x))` gives back the same types
(e.g. `random.setstate` needs tuples). Python floats round-trip exactly through JSON.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import torch

_TAG = "__mw__"


def encode(value: Any) -> Any:
    """A JSON-serialisable copy of `value` (tensors are copied to CPU bytes now)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG: "float", "v": repr(value)}
    if isinstance(value, torch.Tensor):
        return _encode_tensor(value)
    if isinstance(value, np.ndarray):
        return {_TAG: "ndarray", "dtype": value.dtype.str, "shape": list(value.shape),
                "data": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()}
    if isinstance(value, np.generic):
        return encode(value.item())
    if isinstance(value, tuple):
        return {_TAG: "tuple", "v": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: encode(v) for k, v in value.items()}
        return {_TAG: "dict", "items": [[encode(k), encode(v)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in checkpoint plain state (no pickling)")


def _encode_tensor(t: torch.Tensor) -> dict:
    if getattr(t, "is_sparse", False) or t.layout != torch.strided:
        raise TypeError("cannot store a non-strided tensor in checkpoint plain state")
    cpu = t.detach().to("cpu").contiguous()
    data = base64.b64encode(cpu.reshape(-1).view(torch.uint8).numpy().tobytes()).decode() if cpu.numel() else ""
    return {_TAG: "tensor", "dtype": str(cpu.dtype).removeprefix("torch."), "shape": list(cpu.shape), "data": data}


def decode(value: Any) -> Any:
    """Invert `encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode(v) for k, v in value.items()}
    if tag == "tuple":
        return tuple(decode(v) for v in value["v"])
    if tag == "dict":
        return {_hashable(decode(k)): decode(v) for k, v in value["items"]}
    if tag == "float":
        return float(value["v"])
    if tag == "tensor":
        return _decode_tensor(value)
    if tag == "ndarray":
        raw = base64.b64decode(value["data"])
        return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    raise ValueError(f"unknown tag {tag!r} in checkpoint plain state")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _decode_tensor(value: dict) -> torch.Tensor:
    dtype = getattr(torch, value["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"bad tensor dtype {value['dtype']!r} in checkpoint plain state")
    shape = value["shape"]
    raw = bytearray(base64.b64decode(value["data"]))
    if not raw:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
    return flat.reshape(shape).clone()


def dumps(value: Any) -> str:
    """`encode` then JSON text."""
    return json.dumps(encode(value), separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    """JSON text then `decode`."""
    return decode(json.loads(text))
