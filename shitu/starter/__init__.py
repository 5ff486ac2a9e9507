"""The offline starter pack: real pretrained weights shipped in registry packages, converted
into ordinary PaddleX model dirs (see :mod:`shitu.starter.recognition` and ``.detector``)."""

MARKER = "starter.json"  # written into each starter model dir: its provenance, and "this is not official"
