"""Evaluation: per-turn win rates against a baseline, judges' intervals, diagnostics, reports and summaries.

`refuel-evaluate` is :mod:`refuel.evaluation.evaluate`; nothing here is imported by training.
"""
