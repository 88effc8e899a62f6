"""REFUEL: Regressing the Relative Future (Gao et al., ICLR 2025, arXiv 2410.04612).

Four groups, one folder each: paired roll-outs from reset points (:mod:`refuel.collection`), the least-squares
loss, the iteration trainer and ``refuel-train`` (:mod:`refuel.training`), per-turn win-rate evaluation
(:mod:`refuel.evaluation`), and REFUEL on the tabular MDP (:mod:`refuel.tabular`). The settings, the command
line, the run folder and the pair records they share sit here at the top.
"""
