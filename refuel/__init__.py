"""REFUEL: Regressing the Relative Future (Gao et al., ICLR 2025, arXiv 2410.04612).

Paired roll-outs from reset points (:mod:`refuel.collect`), the least-squares loss
(:mod:`refuel.loss`), the iterative trainer (:mod:`refuel.trainer`, :mod:`refuel.train`) and
per-turn win-rate evaluation (:mod:`refuel.evaluate`).
"""
