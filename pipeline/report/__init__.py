"""The report: summary rows, overview figures, ``dvc plots`` exports, the HTML and markdown documents, and compare.

- :mod:`~pipeline.report.summary`: one row per run from ``metrics.json``, provenance and recorded settings.
- :mod:`~pipeline.report.claims`: the seed's claims, each tested on the numbers by a stated rule, with a verdict;
  the reparametrisation table.
- :mod:`~pipeline.report.figures`: the overview figures.
- :mod:`~pipeline.report.exports`: the small JSON files that ``dvc plots`` draws.
- :mod:`~pipeline.report.render`: ``reports/index.html`` and ``reports/README.md``.
- :mod:`~pipeline.report.compare`: ``landscape compare`` (metrics and tables across revisions).

Everything here reads the tables and ``metrics.json`` that the earlier stages wrote; nothing is recomputed.
"""
