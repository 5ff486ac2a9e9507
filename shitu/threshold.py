"""The one threshold policy: which recognition threshold a query gets, and which matches it accepts.

A query's threshold is, in this order, the one the call gives, the pipeline YAML's ``rec_threshold``,
the index's own (its calibration's operating point, or the level a projected index was built for)
and the active recognition model's default. A match is an answer when its score reaches the
threshold and, for an index whose calibration keeps a floor in the model's own feature space, its
similarity there reaches the floor too. Nothing else in the product decides either: the engine asks
:class:`ThresholdPolicy` for the number and every result asks :func:`accepts` about its candidates —
so a result can be decided again at another threshold without a new query
(:meth:`shitu.results.Recognition.at_threshold`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def accepts(score: float, threshold: float, raw_similarity: float | None = None, floor: float | None = None) -> bool:
    """Is a match of ``score`` an answer at ``threshold``? With a ``floor``, its similarity in the
    model's own space (``raw_similarity``) must reach it too; without that similarity (``None`` or
    NaN) the threshold alone decides."""
    if score < threshold:
        return False
    return floor is None or raw_similarity is None or math.isnan(raw_similarity) or raw_similarity >= floor


@dataclass(frozen=True)
class ThresholdPolicy:
    """Which threshold a query gets when its call names none."""

    configured: float | None  # the pipeline YAML's rec_threshold: over every index's own
    model_default: float  # the active recognition model's own

    def for_index(self, index_own: float | None) -> float:
        """The threshold of a query of an index whose own threshold is ``index_own`` (``None``:
        uncalibrated)."""
        if self.configured is not None:
            return self.configured
        return self.model_default if index_own is None else index_own

    def resolve(self, given: float | None, index_own: float | None) -> float:
        """The call's own threshold when it gives one, else :meth:`for_index`."""
        return self.for_index(index_own) if given is None else given
