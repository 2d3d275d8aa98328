"""Sweeps: the flatness sweep's grid runner, the statistics over a sweep, seed replicas and their intervals.

- :mod:`~pipeline.sweep.grid`: the grid of (model, lr, batch size, seed) points, each trained and measured once.
- :mod:`~pipeline.sweep.stats`: Kendall's tau, Jiang et al.'s granulated coefficient, the batch-size effect.
- :mod:`~pipeline.sweep.seeds`: the seed replicas of a run and the Student-t interval of their headlines.
- :mod:`~pipeline.sweep.figures`: the sweep's figure.
"""
