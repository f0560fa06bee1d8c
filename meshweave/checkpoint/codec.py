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


class PlainStateError(ValueError):
    """Plain state that `encode` did not write (a wrong tag, field, dtype, shape or byte count)."""


_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
_NUMPY_KINDS = "biufc"  # bool, ints, floats, complex: raw numbers, never Python objects


def dtype_by_name(name: str) -> torch.dtype | None:
    """The torch dtype called `name` ("float32", "bfloat16", ...), or None (no attribute lookup on torch)."""
    return _DTYPES.get(name)


def decode(value: Any) -> Any:
    """Invert `encode`; raise PlainStateError for anything `encode` cannot have written."""
    try:
        return _decode(value)
    except RecursionError:
        raise PlainStateError("nested too deeply") from None


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: _decode(v) for k, v in value.items()}
    if tag == "tuple":
        return tuple(_decode(v) for v in _field(value, "v", list))
    if tag == "dict":
        return dict(_item(pair) for pair in _field(value, "items", list))
    if tag == "float":
        text = _field(value, "v", str)
        if text not in ("inf", "-inf", "nan"):
            raise PlainStateError(f"tagged float {text!r} is not inf, -inf or nan")
        return float(text)
    if tag == "tensor":
        return _decode_tensor(value)
    if tag == "ndarray":
        return _decode_ndarray(value)
    raise PlainStateError(f"unknown tag {tag!r} in checkpoint plain state")


def _field(value: dict, key: str, kind: type) -> Any:
    if key not in value:
        raise PlainStateError(f"{value.get(_TAG)!r} object lacks {key!r}")
    if not isinstance(value[key], kind) or isinstance(value[key], bool) and kind is not bool:
        raise PlainStateError(f"{value.get(_TAG)!r} object: {key!r} is a {type(value[key]).__name__}, "
                              f"expected {kind.__name__}")
    return value[key]


def _item(pair: Any) -> tuple[Any, Any]:
    if not isinstance(pair, list) or len(pair) != 2:
        raise PlainStateError("'dict' object: items must be [key, value] pairs")
    key = _hashable(_decode(pair[0]))
    try:
        hash(key)
    except TypeError:
        raise PlainStateError(f"'dict' object: key {key!r} is not hashable") from None
    return key, _decode(pair[1])


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _shape(value: dict) -> list[int]:
    shape = _field(value, "shape", list)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise PlainStateError(f"{value[_TAG]!r} object: shape {shape!r} is not a list of non-negative ints")
    return shape


def _raw(value: dict, nbytes: int) -> bytes:
    try:
        raw = base64.b64decode(_field(value, "data", str), validate=True)
    except ValueError as err:  # binascii.Error
        raise PlainStateError(f"{value[_TAG]!r} object: data is not base64 ({err})") from None
    if len(raw) != nbytes:
        raise PlainStateError(f"{value[_TAG]!r} object: {len(raw)} bytes of data, its dtype and shape need {nbytes}")
    return raw


def _decode_tensor(value: dict) -> torch.Tensor:
    dtype = dtype_by_name(_field(value, "dtype", str))
    if dtype is None:
        raise PlainStateError(f"bad tensor dtype {value['dtype']!r} in checkpoint plain state")
    shape = _shape(value)
    raw = bytearray(_raw(value, math.prod(shape) * dtype.itemsize))
    if not raw:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
    return flat.reshape(shape).clone()


def _decode_ndarray(value: dict) -> np.ndarray:
    try:
        dtype = np.dtype(_field(value, "dtype", str))
    except (TypeError, ValueError) as err:
        raise PlainStateError(f"bad array dtype {value['dtype']!r} in checkpoint plain state ({err})") from None
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise PlainStateError(f"array dtype {value['dtype']!r} is not a plain number type")
    shape = _shape(value)
    raw = _raw(value, math.prod(shape) * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def dumps(value: Any) -> str:
    """`encode` then JSON text."""
    return json.dumps(encode(value), separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    """JSON text then `decode` (ValueError for text that is not JSON, PlainStateError for bad structure)."""
    return decode(json.loads(text))
