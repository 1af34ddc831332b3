"""Wire format: openpi's websocket protocol, msgpack with numpy arrays in openpi-client's encoding.

    connect          -> server sends one binary frame: the metadata dict
    binary frame     <- client sends one observation dict (a request)
    binary frame     -> server answers {"actions": float32 [H, D], "policy_timing": {...}, "server_timing": {...}, ...}
    text frame       -> server answers an error instead: "pirl-serve error [CODE]: message"
    GET /healthz     -> 200 "OK" (503 while draining on shutdown); plain HTTP, no API key needed

An ndarray travels as a map {b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": [...]},
a numpy scalar as {b"__npgeneric__": True, b"data": item, b"dtype": dtype.str}; everything else is plain
msgpack. openpi's client raises RuntimeError on a text frame (its error path), so openpi client loops see
pirl's errors the same way; `pirl.serve.client` raises `ServerError` / `ServerBusy` (RuntimeError subclasses)
with the code parsed back.

Decoding is stricter than openpi's (a server must not trust its input): object / void / complex dtypes are
refused (an object array built from raw bytes would dereference attacker-chosen pointers), and the byte
count must match dtype x shape exactly.
"""

from __future__ import annotations

import re
from typing import Any

import msgpack
import numpy as np

ERROR_PREFIX = "pirl-serve error"
ERROR_CODES = ("bad_request", "busy", "unauthorized", "shutting_down", "internal")
"""bad_request: this request is malformed (fix it, the connection stays open); busy: the queue is full,
retry later; shutting_down: the server is draining; internal: the batch failed on the server."""

_REFUSED_KINDS = ("V", "O", "c")


class DecodeError(ValueError):
    """A frame that is not a valid msgpack request."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"unsupported dtype {obj.dtype} (object, void and complex arrays are not sent)")
    if isinstance(obj, np.ndarray):
        obj = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode {type(obj).__name__} (send numpy arrays, numbers, strings, lists, dicts)")


def _dtype(spec: Any) -> np.dtype:
    if not isinstance(spec, str | bytes):
        raise DecodeError(f"ndarray dtype must be a string, got {type(spec).__name__}")
    try:
        dtype = np.dtype(spec.decode() if isinstance(spec, bytes) else spec)
    except TypeError as err:
        raise DecodeError(f"unknown ndarray dtype {spec!r}") from err
    if dtype.kind in _REFUSED_KINDS:
        raise DecodeError(f"ndarray dtype {dtype} is not accepted (object, void and complex arrays are refused)")
    return dtype


def _unpack_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(shape, list | tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise DecodeError(f"ndarray shape must be a list of non-negative ints, got {shape!r}")
        if not isinstance(data, bytes):
            raise DecodeError("ndarray data must be bytes")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if expected != len(data):
            raise DecodeError(f"ndarray of dtype {dtype} and shape {tuple(shape)} needs {expected} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def packb(obj: Any) -> bytes:
    """Any msgpack-able structure with numpy arrays / scalars inside -> bytes (openpi's encoding)."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """bytes -> the structure, arrays as read-only numpy views. Raises DecodeError on anything malformed."""
    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False, strict_map_key=False)
    except DecodeError:
        raise
    except Exception as err:  # msgpack raises several types (ExtraData, FormatError, StackError, ValueError...)
        raise DecodeError(f"frame is not valid msgpack: {type(err).__name__}: {err}") from None


def error_text(code: str, message: str) -> str:
    assert code in ERROR_CODES, code
    return f"{ERROR_PREFIX} [{code}]: {message}"


_ERROR_RE = re.compile(rf"^{re.escape(ERROR_PREFIX)} \[(\w+)\]: (.*)$", re.S)


def parse_error(text: str) -> tuple[str, str]:
    """An error frame -> (code, message); a text frame from another server -> ("internal", text)."""
    match = _ERROR_RE.match(text)
    return (match.group(1), match.group(2)) if match else ("internal", text)
