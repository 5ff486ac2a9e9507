"""The report's fixed criteria (what counts as a mislabel, a duplicate, a fragile label) and the
size limits that keep it bounded inside a web request. The criteria are part of the report's
meaning (its JSON states them); the limits only decide how much is measured exactly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Progress = Callable[[int, int, str], None]  # (done, total, what), as the engine's

SEED = 0  # every sample and the map's start are seeded: the same index gives the same report
NEIGHBOURS = 5  # k of recall@k and of the mislabel vote
MISLABEL_MIN_VOTES = 4  # of the NEIGHBOURS nearest: a clear majority on one other label
DUPLICATE_SIMILARITY = 0.98  # cosine in the stored space at or above which two entries are near duplicates
FRAGILE_IMAGES = 2  # labels with at most this many images are listed (1 image: cannot be evaluated)
CONFUSION_EXAMPLES = 3  # example entries per side of a confused pair
TIE_DECIMALS = 5  # similarities equal to this many decimals are ties, broken by storage order
KNN_CHUNK = 2_048  # queries per exact search call (bounds memory; a progress step)
IVF_NPROBE = 6  # of ~4·sqrt(n) lists, probed by the all-entry neighbour pass above the full limit

TSNE_PERPLEXITY = 15.0  # ~45 neighbours: a label's few images and their closest rivals
TSNE_EARLY_ITERATIONS = 100  # with early exaggeration: clusters form
TSNE_LATE_ITERATIONS = 200  # then they settle (bench/results/map_methods.txt: more buys little)

HTML_ROWS = 100  # rows per section in the HTML page (the CSVs have everything); their thumbnails are read
HTML_LABEL_ROWS = 300  # worst labels shown in the HTML page


@dataclass(frozen=True)
class Limits:
    """How much of a large gallery is measured exactly.

    ``full_limit``: up to this many entries every entry is a leave-one-out query; above it
    ``sample_queries`` seeded random entries are, each against the full gallery. ``map_points``:
    entries drawn on the 2-D map at most (whole labels, at most ``map_per_label`` images each,
    beyond that). ``max_listed``: rows kept per list (counts stay complete)."""

    full_limit: int = 20_000
    sample_queries: int = 5_000
    map_points: int = 2_500
    map_per_label: int = 50
    max_listed: int = 5_000
