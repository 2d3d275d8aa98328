"""Curvature of the loss: operators over a probe set, matrix-free solvers, flatness, dynamics, and their figures.

- :mod:`~pipeline.curvature.operators`: Hessian- and GGN-vector products with exact probe-set weighting.
- :mod:`~pipeline.curvature.eigen`, :mod:`~pipeline.curvature.trace`, :mod:`~pipeline.curvature.density`: solvers
  split by what they estimate (eigenpairs; the trace; the spectral density), which see only a ``matvec`` and a
  dimension (:mod:`~pipeline.curvature._krylov` holds what they share, :mod:`~pipeline.curvature._checks` the
  argument checks and :class:`CurvatureError`).
- :mod:`~pipeline.curvature.flatness`: ε-sharpness, the PAC-Bayes σ and adaptive sharpness.
- :mod:`~pipeline.curvature.reparam`: Dinh et al.'s function-preserving rescalings (the test a flatness measure must
  pass).
- :mod:`~pipeline.curvature.dynamics`: gradient noise, sharpness along a direction, the quadratic model of a step,
  the batch sharpness and Adam's preconditioned sharpness.
- :mod:`~pipeline.curvature.analysis`: what the ``hessian`` stage computes per checkpoint, as tidy table rows.
- :mod:`~pipeline.curvature.figures`: the ``hessian`` stage's figures.
"""
