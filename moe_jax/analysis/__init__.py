"""Routing analysis: record who went where (recorder.py, records.py), then the analyses of the
MoE literature over those records (analyses.py), and a report (report.py, `python -m
moe_jax.analyze`). Numpy only at import time; matplotlib and pandas are imported when a plot
or a table is asked for.
"""
