"""Scoring: text and image reconstruction metrics, and the scorer that compares a reconstruction with the private batch.

The only code in leak_audit that sees the private batch next to a reconstruction lives here. Metric names are in :mod:`leak_audit.metrics.names`, which imports nothing heavy.
"""
