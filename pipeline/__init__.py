"""Loss-landscape geometry pipeline: a library grouped in wings by idea, importable without DVC or Prefect.

Top level (the floor every wing stands on): ``config`` (typed params), ``errors``, ``io`` (atomic writes, finite
JSON, figures), ``repro`` (kernel pinning), ``provenance``, ``tables`` (Parquet schemas), ``metrics`` (every
``metrics.json`` headline), ``data`` (datasets and the probe set). Wings, lowest first: ``curvature``, ``training``,
``landscape``, ``sweep``, ``report``; then ``flows`` (Prefect only), and ``stage`` / ``cli`` on top. Imports go
downward only (``tests/test_layers.py``).
"""

__version__ = "0.1.0"
