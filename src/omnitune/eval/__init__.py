"""Evaluation: task metrics (metrics.py), the batched runner (runner.py) and its report (report.py)."""
