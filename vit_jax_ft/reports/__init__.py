"""Evaluation reports of a run (used by `vit_jax_ft.evaluate`, `predict`, `explain` and the train loop).

writer.py          writes reports/<split>_<checkpoint>/ for a run (workdir.py restores it)
report.py          the JSON report of one split and its PNGs
classification.py  per-class report, top-k, operating points
multilabel.py      multi-label metrics and threshold tuning
calibration.py     expected calibration error and reliability bins
curves.py          learning curves and the run summary from TensorBoard event files
plots.py           the PNGs (matplotlib, no pyplot state)
saliency.py        attention rollout and Grad-CAM
markdown.py        report.md
bootstrap.py       stratified bootstrap resamples and the reports' 95% confidence intervals
compare.py         predictions.npz and the paired bootstrap difference of two runs
"""
