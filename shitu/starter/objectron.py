"""Fetching MediaPipe's objectron SSD (TFLite) from the npm registry, with pinned sha256 checks.

The npm package ``@mediapipe/objectron`` (Apache-2.0) ships an SSD-MobileNetV2 trained on Open
Images v4 as an fp16 TFLite flatbuffer, packed with its label map into one asset file.
:func:`fetch_objectron_tflite` downloads the package once and leaves the checked model and label
map in a cache dir, so later conversions need no network.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

from shitu import npm
from shitu.errors import StarterModelUnavailable
from shitu.fsutil import sha256_bytes, sha256_file, write_bytes_atomic

__all__ = [
    "LABELMAP_FILENAME",
    "OBJECTRON_NPM_PACKAGE",
    "OBJECTRON_NPM_VERSION",
    "OBJECTRON_TARBALL_SHA256",
    "OBJECTRON_TARBALL_URL",
    "OBJECTRON_TFLITE_SHA256",
    "OIDV4_LABELS",
    "TFLITE_FILENAME",
    "fetch_objectron_tflite",
]

OBJECTRON_NPM_PACKAGE = "@mediapipe/objectron"
OBJECTRON_NPM_VERSION = "0.4.1675468480"
OBJECTRON_TARBALL_URL = (
    "https://registry.npmjs.org/@mediapipe/objectron/-/objectron-0.4.1675468480.tgz"
)
OBJECTRON_TARBALL_SHA256 = "fc3e37b326b05e8f596099c90b3e0931b05a56cd3160b9ac450b621794bac94c"
OBJECTRON_TFLITE_SHA256 = "d0a5255bf8c4f5a0bc4240741a76c41d5e939f7655078f945f50ab53a9375da6"
OBJECTRON_LABELMAP_SHA256 = "c148336a65f673013609a923fdcbdeec0f49df935045029c3746a3828a0e80e0"
TFLITE_FILENAME = "object_detection_ssd_mobilenetv2_oidv4_fp16.tflite"
LABELMAP_FILENAME = "object_detection_oidv4_labelmap.txt"
# Byte ranges inside package/objectron_solution_packed_assets.data, as listed by the package's
# objectron_solution_packed_assets_loader.js.
_PACKED_ASSETS_MEMBER = "package/objectron_solution_packed_assets.data"
_LABELMAP_RANGE = (0, 184)
_TFLITE_RANGE = (184, 9987912)

# Open Images v4 classes of the objectron SSD, in output order; index 0 ("???") is background.
# Used when the label map is not beside the model.
OIDV4_LABELS: tuple[str, ...] = (
    "???", "Bicycle", "Boot", "Laptop", "Person", "Chair", "Cattle", "Desk", "Cat",
    "Computer mouse", "Computer monitor", "Box", "Mug", "Coffee cup", "Stationary bicycle",
    "Table", "Bottle", "High heels", "Vehicle", "Footwear", "Dog", "Book", "Camera", "Car",
)  # fmt: skip


def _download_tarball(workdir: Path) -> bytes:
    """The package tarball (see :func:`shitu.npm.fetch_tarball`)."""
    try:
        tarball = npm.fetch_tarball(OBJECTRON_NPM_PACKAGE, OBJECTRON_NPM_VERSION, OBJECTRON_TARBALL_URL, workdir)
        return tarball.read_bytes()
    except npm.RegistryUnreachable as exc:
        raise StarterModelUnavailable(str(exc)) from None


def fetch_objectron_tflite(cache_dir: Path) -> Path:
    """Return the cached objectron SSD ``.tflite`` in ``cache_dir``, downloading it once.

    Both the package tarball and the extracted model are checked against pinned sha256 values;
    the label map is written next to the model as ``object_detection_oidv4_labelmap.txt``.
    Raises :class:`StarterModelUnavailable` when the registry is unreachable or a checksum fails.
    """
    cache_dir = Path(cache_dir)
    tflite_path = cache_dir / TFLITE_FILENAME
    labelmap_path = cache_dir / LABELMAP_FILENAME
    if (
        tflite_path.is_file()
        and labelmap_path.is_file()
        and sha256_file(tflite_path) == OBJECTRON_TFLITE_SHA256
    ):
        return tflite_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=cache_dir) as tmp:
        tarball = _download_tarball(Path(tmp))
    if sha256_bytes(tarball) != OBJECTRON_TARBALL_SHA256:
        raise StarterModelUnavailable(
            f"checksum mismatch for the {OBJECTRON_NPM_PACKAGE} tarball "
            f"(sha256 {sha256_bytes(tarball)}, expected {OBJECTRON_TARBALL_SHA256})"
        )
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
            member = tar.extractfile(_PACKED_ASSETS_MEMBER)
            if member is None:
                raise KeyError(_PACKED_ASSETS_MEMBER)
            packed = member.read()
    except (KeyError, tarfile.TarError) as exc:
        raise StarterModelUnavailable(f"unexpected package layout: {exc}") from exc
    model_bytes = packed[slice(*_TFLITE_RANGE)]
    labelmap_bytes = packed[slice(*_LABELMAP_RANGE)]
    for what, data, expected in (
        ("model", model_bytes, OBJECTRON_TFLITE_SHA256),
        ("label map", labelmap_bytes, OBJECTRON_LABELMAP_SHA256),
    ):
        if sha256_bytes(data) != expected:
            raise StarterModelUnavailable(
                f"checksum mismatch for the objectron SSD {what} "
                f"(sha256 {sha256_bytes(data)}, expected {expected})"
            )
    # Label map first: the model file's presence is what marks the cache as complete.
    write_bytes_atomic(labelmap_path, labelmap_bytes)
    write_bytes_atomic(tflite_path, model_bytes)
    return tflite_path
