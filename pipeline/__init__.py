"""Loss-landscape geometry pipeline: data, models, training, curvature, scans, tables and plots.

Importable and testable without DVC or Prefect; Prefect is used only under ``pipeline.flows``.
"""

__version__ = "0.1.0"
