"""The legacy (non-zip) torch checkpoint reader, on files written here without torch."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from shitu.starter.torch_legacy import LEGACY_MAGIC, load_legacy_state_dict


@pytest.fixture
def fake_torch(monkeypatch):
    """Just enough of a ``torch`` module for pickle to write torch's global references."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:  # noqa: D401 - stands in for torch.FloatStorage
        pass

    class LongStorage:
        pass

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError

    for obj, module in ((FloatStorage, "torch"), (LongStorage, "torch"), (_rebuild_tensor_v2, "torch._utils")):
        obj.__module__, obj.__qualname__ = module, obj.__name__
    torch.FloatStorage, torch.LongStorage, utils._rebuild_tensor_v2 = FloatStorage, LongStorage, _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch, utils


def write_legacy(tensors: dict, storages: dict, storage_types: dict, fake_torch) -> bytes:
    """``tensors``: name → (storage key, offset, shape, stride); ``storages``: key → flat array."""
    torch, utils = fake_torch

    class Storage:
        def __init__(self, key):
            self.key = key

    class Tensor:
        def __init__(self, key, offset, shape, stride):
            self.args = (Storage(key), offset, shape, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return utils._rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                kind = storage_types[obj.key]
                return ("storage", kind, obj.key, "cpu", storages[obj.key].size)
            return None

    out = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, out, protocol=2)
    Pickler(out, protocol=2).dump(collections.OrderedDict((n, Tensor(*spec)) for n, spec in tensors.items()))
    pickle.dump(list(storages), out, protocol=2)
    for array in storages.values():
        out.write(struct.pack("<q", array.size))
        out.write(array.tobytes())
    return out.getvalue()


def test_reads_tensors_views_and_dtypes(tmp_path, fake_torch):
    torch, _ = fake_torch
    flat = np.arange(12, dtype=np.float32)
    counts = np.array([7, -3], dtype=np.int64)
    data = write_legacy(
        {
            "conv.weight": ("0", 0, (3, 4), (4, 1)),
            "conv.weight_t": ("0", 0, (4, 3), (1, 4)),  # a transposed view of the same storage
            "tail": ("0", 8, (4,), (1,)),  # an offset into it
            "bn.num_batches": ("1", 0, (2,), (1,)),
        },
        {"0": flat, "1": counts},
        {"0": torch.FloatStorage, "1": torch.LongStorage},
        fake_torch,
    )
    (tmp_path / "w.pt").write_bytes(data)
    weights = load_legacy_state_dict(tmp_path / "w.pt")
    assert list(weights) == ["conv.weight", "conv.weight_t", "tail", "bn.num_batches"]
    np.testing.assert_array_equal(weights["conv.weight"], flat.reshape(3, 4))
    np.testing.assert_array_equal(weights["conv.weight_t"], flat.reshape(3, 4).T)
    np.testing.assert_array_equal(weights["tail"], [8, 9, 10, 11])
    assert weights["bn.num_batches"].dtype == np.int64 and weights["bn.num_batches"].tolist() == [7, -3]


def test_refuses_other_formats_and_truncated_files(tmp_path, fake_torch):
    torch, _ = fake_torch
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04 a zip checkpoint")
    with pytest.raises(ValueError, match="not a legacy torch checkpoint"):
        load_legacy_state_dict(tmp_path / "zip.pt")
    good = write_legacy({"w": ("0", 0, (4,), (1,))}, {"0": np.ones(4, np.float32)}, {"0": torch.FloatStorage},
                        fake_torch)  # fmt: skip
    (tmp_path / "cut.pt").write_bytes(good[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_legacy_state_dict(tmp_path / "cut.pt")
