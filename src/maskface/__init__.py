"""maskface: masked face generation and masked face recognition (the GuGuGirls pipeline).

One module per stage: ``datasets`` (acquisition, raw manifests, LFW pairs), ``align`` (MTCNN + 5-point
similarity alignment), ``mask`` (dlib 68-landmark masks), ``train`` (SphereFace), ``features`` and
``evaluate`` (LFW protocol), ``demo`` (open-set video recognition). Shared helpers: ``imageio``,
``manifest`` (Parquet + provenance), ``resources`` (model files shipped by packages), ``download``.
"""

__version__ = "0.1.0"
