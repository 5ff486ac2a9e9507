"""PP-ShiTuV2 general image recognition on PaddleX, with an offline starter model pack.

>>> from shitu import create_pipeline  # doctest: +SKIP
>>> pipeline = create_pipeline("PP-ShiTuV2", device="cpu")  # doctest: +SKIP
"""

from shitu.errors import NotFound, ShiTuError, StarterModelUnavailable
from shitu.index import GalleryIndex
from shitu.pipeline import ShiTuPipeline, create_pipeline
from shitu.results import RecognizedObject, ShiTuResult

IndexData = GalleryIndex  # PaddleX's name for the same thing

__all__ = [
    "GalleryIndex",
    "IndexData",
    "NotFound",
    "RecognizedObject",
    "ShiTuError",
    "ShiTuPipeline",
    "ShiTuResult",
    "StarterModelUnavailable",
    "create_pipeline",
]
__version__ = "0.1.0"
