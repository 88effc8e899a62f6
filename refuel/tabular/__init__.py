"""REFUEL on the tabular dialogue MDP (:mod:`envs.tabular`): exact dynamic programming and mirror descent."""
