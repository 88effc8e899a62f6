"""Collection: where pairs start (reset points), the round loop of policies and simulated user, REFUEL pairs on
the vector env, and crash-safe collection shards."""
