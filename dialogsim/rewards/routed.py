"""A reward that picks a reward model per prompt row by the row's task (math rows → math, code rows → code)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import RewardModel, check_batch


class TaskRoutedReward:
    """Scores each dialogue with the reward model of its row's task (implements ``RewardModel``).

    A row goes to the first route whose key is a prefix of ``row.task`` (``"Math"`` matches
    ``"Math_CoT"`` and ``"Math_PoT"``); each route is called once per :meth:`score` call with its rows.
    Rewards keep each route's own scale (e.g. math in [-0.5, 1.5], code in {0, 1}); REFUEL compares two
    dialogues of the same prompt, so they always share a scale.

    NaN, with the reason counted: ``"unsupported_task:<task>"`` when no route matches. :attr:`failures`
    adds up this router's reasons and those of every route.

    Args:
        routes: task prefix → reward model, e.g. ``{"Math": MathAnswerReward(), "Coding": CodeTestReward()}``.

    Raises:
        ValueError: ``routes`` is empty.
    """

    def __init__(self, routes: Mapping[str, RewardModel]) -> None:
        if not routes:
            raise ValueError("TaskRoutedReward needs at least one route, e.g. {'Math': MathAnswerReward()}")
        self.routes = dict(routes)
        self.unrouted: Counter[str] = Counter()

    @property
    def failures(self) -> Counter[str]:
        """NaN reasons of the router (no matching route) and of every route, summed."""
        total = Counter(self.unrouted)
        for reward in self.routes.values():
            total.update(reward.failures)
        return total

    def route(self, task: str) -> str | None:
        """The key of the route for ``task``, or ``None``."""
        return next((prefix for prefix in self.routes if task.startswith(prefix)), None)

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per dialogue, from the reward model of its row's task.

        Raises:
            ValueError: ``dialogues`` and ``rows`` differ in length.
        """
        check_batch(dialogues, rows, "TaskRoutedReward")
        rewards = [float("nan")] * len(dialogues)
        by_route: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            key = self.route(row.task)
            if key is None:
                self.unrouted[f"unsupported_task:{row.task}"] += 1
            else:
                by_route.setdefault(key, []).append(index)
        for key, indices in by_route.items():
            scores = self.routes[key].score([dialogues[i] for i in indices], [rows[i] for i in indices])
            for index, value in zip(indices, scores, strict=True):
                rewards[index] = value
        return rewards
