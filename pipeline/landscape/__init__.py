"""Loss landscapes: the loss and accuracy of a trained network on lines, planes and paths of weight space.

- :mod:`pipeline.landscape.directions`: random filter-normalised directions (Li et al. 2018), PCA of a training
  trajectory, Hessian eigenvectors, model differences, and content ids for directions.
- :mod:`pipeline.landscape.evaluate`: the grid engine, loss and accuracy at many points per forward pass
  (``torch.func.vmap``, or an explicit batched forward for linear chains), the measured chunk size and
  convolution layout, and the in-place baseline of earlier packages.
- :mod:`pipeline.landscape.scan`: grids, tiles stored on disk so a scan resumes, and the loss barrier of a path.
"""
