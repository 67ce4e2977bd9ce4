"""Evaluation: the metric math, every score against its label, the per-run tables, seed spread, costs and the report."""
