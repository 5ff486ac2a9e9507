"""PP-ShiTuV2 general image recognition on PaddleX, with an offline starter model pack.

>>> from shitu import create_pipeline  # doctest: +SKIP
>>> pipeline = create_pipeline("PP-ShiTuV2", device="cpu")  # doctest: +SKIP
"""

from shitu.engine import Engine
from shitu.errors import NotFound, ShiTuError, StarterModelUnavailable
from shitu.index import GalleryIndex
from shitu.paddlex_api import IndexData, ShiTuPipeline, create_pipeline
from shitu.results import Recognition, RecognizedObject, ShiTuResult

__all__ = [
    "Engine",
    "GalleryIndex",
    "IndexData",
    "NotFound",
    "RecognizedObject",
    "Recognition",
    "ShiTuError",
    "ShiTuPipeline",
    "ShiTuResult",
    "StarterModelUnavailable",
    "create_pipeline",
]
__version__ = "0.2.0"
