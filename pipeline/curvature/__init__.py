"""Curvature of the loss: operators (Hessian, Gauss-Newton) over a probe set, matrix-free solvers, and the report.

- :mod:`pipeline.curvature.operators`: Hessian- and GGN-vector products with exact probe-set weighting.
- :mod:`pipeline.curvature.spectral`: Lanczos, power iteration, trace estimators and spectral density, which see
  only a ``matvec`` and a dimension.
- :mod:`pipeline.curvature.analysis`: one curvature report per model, as tidy table rows.
"""
