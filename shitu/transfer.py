"""Moving a gallery between this project's faiss indices and Milvus (``shitu milvus-export`` /
``shitu milvus-import``).

What moves is what defines the gallery: every entry's id, label, source and thumbnail, its
*unprojected* feature vector (an adapted index keeps those), and in the collection's metadata
the next id, the feature model, how it was adapted and a threshold the user picked. Coming
back, the index is rebuilt from them: the projection is refitted and the threshold curve
remeasured, exactly as a fresh build of those vectors would (both are deterministic), ids stay
what they were and ids handed out before are never reused.

Vectors go to Milvus unprojected on purpose: any Milvus client can search them with the
feature model's own query vectors, without our projection. A PCA-whitened index
(``whiten=True``) keeps no unprojected vectors, so it cannot be moved: rebuild it without
whitening first (adaptation is the better choice anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shitu.errors import ShiTuError
from shitu.gallery import plain_share
from shitu.index import GalleryIndex

BATCH = 2000
FORMAT = 1  # of the metadata we keep in Milvus


def to_milvus(
    index: GalleryIndex,
    milvus,
    name: str,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write ``index`` into the Milvus collection of gallery ``name``; returns the entries written."""
    ids, _ = index.vectors()
    order = np.argsort(ids)
    ids = ids[order]
    if index.whitening is not None and index.raw_chunks is None and index.base.local:
        raise ShiTuError(
            "this index is PCA-whitened and keeps no unprojected vectors, so it cannot be moved: "
            "rebuild it without whitening (adaptation is the default and does better)"
        )
    vectors = index.raw_features(ids) if index.whitening is not None else index.vectors()[1][order]
    calibration = index.calibration
    picked = calibration is not None and calibration.chosen_by == "user"
    meta = {
        "format": FORMAT,
        "next_id": index.next_id,
        "feature_model": index.feature_model,
        "adapt": index.adaptation.mode if index.adaptation is not None else "off",
        "user_threshold": calibration.threshold if picked else None,
        "entries": len(ids),
    }
    if overwrite and milvus.exists(name):
        milvus.drop(name)
    milvus.create(name, vectors.shape[1], metric_type=index.metric_type, index_type=index.index_type, meta=meta)
    try:
        for start in range(0, len(ids), BATCH):
            part = ids[start : start + BATCH].tolist()
            rows = index.rows.get(part)
            milvus.insert(
                name, part, vectors[start : start + BATCH], index.labels_of(part),
                [rows.get(i, ("", None))[0] for i in part], [rows.get(i, ("", None))[1] for i in part],
            )  # fmt: skip
            if progress is not None:
                progress(min(start + BATCH, len(ids)), len(ids))
        milvus.flush(name)
    except BaseException:
        milvus.drop(name)  # no half-written gallery stays behind
        raise
    return len(ids)


def from_milvus(milvus, name: str, *, progress: Callable[[int, int], None] | None = None) -> GalleryIndex:
    """The gallery ``name`` of Milvus as a new (unsaved) index."""
    info = milvus.info(name)
    meta = milvus.get_meta(name)
    total = milvus.count(name)
    if total == 0:
        raise ShiTuError(f"the Milvus gallery {name!r} is empty: an index needs at least one entry")
    ids, vectors, labels, sources, thumbnails = [], [], [], [], []
    for row in milvus.iter_all(name):
        ids.append(row["id"])
        vectors.append(row["vector"])
        labels.append(row["label"])
        sources.append(row["source"])
        thumbnails.append(row["thumbnail"])
        if progress is not None and len(ids) % BATCH == 0:
            progress(len(ids), total)
    metric = info["metric_type"] if info["metric_type"] in ("IP", "L2") else "IP"  # COSINE: unit vectors, same order
    index = GalleryIndex.build(
        np.stack(vectors), labels, ids=ids, index_type=info["index_type"], metric_type=metric, sources=sources,
        thumbnails=thumbnails, feature_model=meta.get("feature_model"), adapt=meta.get("adapt") or "off",
        plain=plain_share(thumbnails),
    )  # fmt: skip
    index.retire_ids_below(int(meta.get("next_id") or 0))
    threshold = meta.get("user_threshold")
    if threshold is not None and index.calibration is not None:
        index = index.with_threshold(float(threshold))
        index.forget_lineage()
    return index
