"""Chat-generation backends: one ``chat`` call serves a whole batch of conversations."""

from dialogsim.backends.base import ChatBackend, Completion, WeightSyncBackend

__all__ = ["ChatBackend", "Completion", "WeightSyncBackend"]
