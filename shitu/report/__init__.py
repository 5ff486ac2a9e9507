"""A quality report on any gallery index, computed from its stored vectors and labels alone.

No model runs. One :func:`gallery_report` call feeds the UI's Evaluate tab, ``shitu evaluate``,
``GET /shitu-index/{indexKey}/report`` and :meth:`Engine.report`. Data flows one way:

* :mod:`~shitu.report.compute` — the statistics (leave-one-out recall, confusions, suspected
  mislabels, near duplicates, few-image labels, the threshold curve) with numpy and faiss, over
  :mod:`~shitu.report.neighbours` (exact and approximate k-NN);
* :mod:`~shitu.report.layout` — the 2-D map (openTSNE) and which entries it draws;
* :mod:`~shitu.report.model` — the result, :class:`GalleryReport`, and its exports
  (``to_dict``, ``to_csv``, ``to_html``, ``summary_lines``);
* :mod:`~shitu.report.charts` and :mod:`~shitu.report.page` — the SVG charts and the HTML page,
  from autoescaped Jinja2 templates (``templates/``), in the words of :mod:`shitu.i18n`;
* :mod:`~shitu.report.params` — the criteria and size limits.
"""

from shitu.report.charts import curve_svg, label_colours, map_svg
from shitu.report.compute import gallery_report
from shitu.report.layout import tsne_2d
from shitu.report.model import GalleryReport, MapPoint
from shitu.report.params import Limits

# the rows of a report (LabelRow, Suspect, DuplicatePair, ...) are in shitu.report.model
__all__ = ["GalleryReport", "Limits", "MapPoint", "curve_svg", "gallery_report", "label_colours", "map_svg", "tsne_2d"]
