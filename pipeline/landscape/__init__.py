"""Loss landscapes: the loss and accuracy of a trained network on lines, planes and paths of weight space.

- :mod:`~pipeline.landscape.directions`: random filter-normalised directions (Li et al. 2018), PCA of a training
  trajectory, Hessian eigenvectors, model differences, and content ids for directions.
- :mod:`~pipeline.landscape.engine`: loss and accuracy at many points per forward pass (``torch.func.vmap``, or an
  explicit batched forward for linear chains), the measured chunk size and convolution layout, and the in-place
  baseline of earlier packages.
- :mod:`~pipeline.landscape.tiles`: grids cut into tiles, the one tile loop, tiles stored on disk so a scan resumes.
- :mod:`~pipeline.landscape.plan`: which lines and planes a run scans.
- :mod:`~pipeline.landscape.measures`: numbers of a scan: barrier and rise of a path, path and surface summaries.
- :mod:`~pipeline.landscape.figures`: line, contour and 3-D figures.
"""
