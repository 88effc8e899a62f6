"""REFUEL: Regressing the Relative Future (Gao et al., ICLR 2025, arXiv 2410.04612).

Paired roll-outs from reset points (:mod:`refuel.collection.collect`), the least-squares loss
(:mod:`refuel.training.loss`), the iterative trainer (:mod:`refuel.training.trainer`, :mod:`refuel.training.train`) and
per-turn win-rate evaluation (:mod:`refuel.evaluation.evaluate`).
"""
