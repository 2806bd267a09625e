"""Building blocks of `vit_jax_ft.evaluate`, `predict` and `explain`.

restore.py         a run's config, data, model and checkpoint; predictions over a split
classification.py  per-class report, top-k, operating points, multi-label metrics
calibration.py     expected calibration error and reliability bins
curves.py          learning curves and the run summary from TensorBoard event files
plots.py           the PNGs (matplotlib, no pyplot state)
markdown.py        report.md
"""
