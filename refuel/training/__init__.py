"""Training: the iteration trainer, its micro-batches and pair layouts, π_t log-probs, the loss, checkpoints,
distributed set-up, and `refuel-train` (:mod:`refuel.training.iterations`)."""
