"""Where REFUEL pairs start: the reset distribution, and the reset points planned from it.

One value, :class:`ResetDistribution`, decides it for every method: which policy rolls in (π_t, π_ref or an
offline dialogue), with what mixture, and the reset turn rule (h ~ U{1..H} for REFUEL, h = H for the paper's
last-turn baselines, :meth:`ResetDistribution.last_turn`). :func:`plan_reset_points` turns it into one
:class:`ResetPoint` (prompt, H, h, source) per pair; :mod:`refuel.collection.collect` plays them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from dialogsim.backends.base import ChatBackend
from dialogsim.data import LoadReport, load_offline_dialogues
from dialogsim.prompts import OfflineDialogue
from dialogsim.settings import SHARE
from dialogsim.simulator import DialogueSimulator
from refuel.config import Rollin

if TYPE_CHECKING:
    from refuel.config import RefuelConfig

TurnRule = Literal["uniform", "last"]
ResetSource = Literal["current", "initial", "prompt", "dataset"]
TURN_RULES: tuple[str, ...] = get_args(TurnRule)
ROLLINS: tuple[str, ...] = get_args(Rollin)
RESET_SOURCES: tuple[str, ...] = get_args(ResetSource)


@dataclass(frozen=True)
class ResetDistribution:
    """The distribution of the reset states s_h that pairs start from, and the reset turn rule.

    - ``rollin="current"`` (REFUEL, the default): roll in with π_t to h.
    - ``rollin="initial"``: with probability ``beta`` the pair starts at the prompt (h = 1, no
      roll-in; ``reset_source`` ``"prompt"``), otherwise it rolls in with π_ref, the initial policy (the
      ``initial_policy`` backend of :func:`refuel.collection.collect.collect_pairs`), to h. The idea of PPO++ (Chang
      et al., 2023, arXiv 2306.11816): start states from β·D + (1−β)·d^{π_ref}, D the prompt distribution.
    - ``rollin="dataset"``: with probability ``dataset_weight`` the pair resets to the prefix s_k of
      an offline dialogue (its messages up to and including its k-th user message), h = k, and π_t
      answers and continues from there with the simulated user; otherwise it rolls in with π_t. The
      idea of DR-PO (Chang et al., 2024, arXiv 2404.08495): reset the learner to states of offline
      demonstrations, so it is trained where its own roll-ins rarely go.

    ``turn_rule`` ``"uniform"`` draws h ~ U{1..H} (REFUEL); ``"last"`` sets h = H. The paper's last-turn
    baselines (REBEL-LT, DPO-LT) are :meth:`last_turn`: roll in with π_ref, h = H.

    Pair rows record their ``reset_source`` (:data:`RESET_SOURCES`). The mixture is drawn per reset point from
    the collection seed, on top of the usual plan (prompt, H, h), which it leaves unchanged (see
    :func:`plan_reset_points`).

    Attributes:
        rollin: ``"current"`` | ``"initial"`` | ``"dataset"``.
        beta: β ∈ [0, 1], probability of a prompt start (``rollin="initial"`` only).
        dataset_weight: w ∈ [0, 1], probability of a dataset reset (``rollin="dataset"`` only).
        offline: the offline dialogues (``rollin="dataset"`` only), from
            :func:`dialogsim.data.load_offline_dialogues`; each one's ``prompt_id`` must be among the
            simulator's prompts.
        turn_rule: ``"uniform"`` | ``"last"``.

    Raises:
        ValueError: unknown ``rollin`` or ``turn_rule``; ``beta`` or ``dataset_weight`` outside [0, 1] or
            given for another ``rollin``; ``rollin="dataset"`` without offline dialogues, or offline
            dialogues for another ``rollin``.
        TypeError: an ``offline`` entry that is not an :class:`~dialogsim.prompts.OfflineDialogue`.

    >>> ResetDistribution("initial", beta=0.5)
    ResetDistribution(rollin='initial', beta=0.5, dataset_weight=0.0, turn_rule='uniform')
    """

    rollin: Rollin = "current"
    beta: float = 0.0
    dataset_weight: float = 0.0
    offline: tuple[OfflineDialogue, ...] = field(default=(), repr=False)
    turn_rule: TurnRule = "uniform"

    def __post_init__(self) -> None:
        if self.rollin not in ROLLINS:
            raise ValueError(f"rollin must be one of {ROLLINS}, got {self.rollin!r}")
        if self.turn_rule not in TURN_RULES:
            raise ValueError(f"turn_rule must be one of {TURN_RULES}, got {self.turn_rule!r}")
        object.__setattr__(self, "offline", tuple(self.offline))
        for name, value, owner in (
            ("beta", self.beta, "initial"),
            ("dataset_weight", self.dataset_weight, "dataset"),
        ):
            if value not in SHARE:  # the range of --rollin_beta and --dataset_weight (refuel.config)
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
            if value and self.rollin != owner:
                raise ValueError(f"{name}={value} applies to rollin={owner!r} only; this is rollin={self.rollin!r}")
        if self.rollin == "dataset" and not self.offline:
            raise ValueError(
                "rollin='dataset' needs offline dialogues: offline=tuple(dialogsim.data.load_offline_dialogues(...)[0])"
            )
        if self.offline and self.rollin != "dataset":
            raise ValueError(f"offline dialogues apply to rollin='dataset' only; this is rollin={self.rollin!r}")
        for index, dialogue in enumerate(self.offline):
            if not isinstance(dialogue, OfflineDialogue):
                raise TypeError(f"offline[{index}] must be an OfflineDialogue, got {type(dialogue).__name__}")

    @classmethod
    def last_turn(cls) -> ResetDistribution:
        """The paper's last-turn baselines (REBEL-LT, DPO-LT): roll in with π_ref, reset at h = H."""
        return cls("initial", turn_rule="last")

    @classmethod
    def from_config(
        cls, config: RefuelConfig, simulator: DialogueSimulator
    ) -> tuple[ResetDistribution, LoadReport | None]:
        """The run's distribution (``--method``, ``--rollin``, ``--rollin_beta``, ``--dataset_weight``), and the
        load report of ``--offline_dialogues`` (``None`` unless ``--rollin dataset``).

        Raises:
            ValueError: ``--rollin dataset`` and no offline dialogue survives loading (the load report says why).
        """
        if config.method != "refuel":
            return cls.last_turn(), None
        if config.rollin != "dataset":
            return cls(config.rollin, beta=config.rollin_beta), None
        offline, report = load_offline_dialogues(
            config.offline_dialogues,
            list(simulator.prompts.values()),
            tokenizer=simulator.tokenizer,
            max_dialogue_tokens=config.max_dialogue_tokens,
            max_turns=config.max_horizon,
            limit=config.offline_limit,
            shuffle=True,
            seed=config.seed,
        )
        if not offline:
            raise ValueError(f"--offline_dialogues {config.offline_dialogues}: no usable dialogue ({report})")
        return cls("dataset", dataset_weight=config.dataset_weight, offline=tuple(offline)), report

    @property
    def mixture(self) -> float:
        """Probability that a reset point comes from the mixed-in part (β or w)."""
        return self.beta if self.rollin == "initial" else self.dataset_weight

    @property
    def needs_initial_policy(self) -> bool:
        """Whether π_ref rolls in (``rollin="initial"``), so a collection needs its backend."""
        return self.rollin == "initial"

    def check(self, simulator: DialogueSimulator, policy: ChatBackend, initial_policy: ChatBackend | None) -> None:
        """Check this distribution against the simulator and the backends of a collection.

        Raises:
            ValueError: ``rollin="initial"`` without ``initial_policy``; an ``initial_policy`` other than
                ``policy`` with ``rollin="current"`` / ``"dataset"`` (they roll in with π_t); an offline
                dialogue whose ``prompt_id`` the simulator does not know.
        """
        if self.needs_initial_policy and initial_policy is None:
            raise ValueError("rollin='initial' rolls in with π_ref: pass its backend as initial_policy=")
        if not self.needs_initial_policy and initial_policy is not None and initial_policy is not policy:
            raise ValueError(
                f"rollin={self.rollin!r} rolls in with the current policy π_t, so initial_policy must be None; "
                "use ResetDistribution('initial', beta=...) to roll in with π_ref"
            )
        unknown = [d.id for d in self.offline if d.prompt_id not in simulator.prompts]
        if unknown:
            raise ValueError(
                f"{len(unknown)} offline dialogues belong to prompts the simulator does not have (first: "
                f"{unknown[:3]}); load them with dialogsim.data.load_offline_dialogues(source, "
                "list(simulator.prompts.values()))"
            )


REFUEL_RESET = ResetDistribution()  # roll in with π_t, h ~ U{1..H}


@dataclass(frozen=True)
class ResetPoint:
    """Where one pair starts: the prompt, the horizon H, the reset turn h (1 ≤ h ≤ H) and the source.

    ``source`` is the pair's ``reset_source``; for ``"dataset"`` the pair starts from
    ``offline.prefix(turn)``.
    """

    prompt_id: str
    horizon: int
    turn: int
    source: ResetSource = "current"
    offline: OfflineDialogue | None = None

    @property
    def policy_turns(self) -> int:
        """The policy replies this pair takes if no episode ends early: the roll-in's h − 1 (none from an offline
        prefix), then H − h + 1 on each of the two branches (the unit of collection's progress bar)."""
        rollin = 0 if self.offline is not None else self.turn - 1
        return rollin + 2 * (self.horizon - self.turn + 1)


def plan_reset_points(
    simulator: DialogueSimulator,
    n_pairs: int,
    rng: np.random.Generator,
    reset: ResetDistribution = REFUEL_RESET,
) -> list[ResetPoint]:
    """One reset point per pair: prompts without replacement (cycling), H ~ U{1..max_horizon}, h by
    ``reset.turn_rule``.

    Then, for ``reset`` with β or w > 0, each point is independently replaced with that probability
    (draws from a generator seeded after the plan above, which therefore does not change):

    - ``rollin="initial"``: a prompt start, h = 1 (same prompt and H), source ``"prompt"``.
    - ``rollin="dataset"``: a reset to an offline dialogue d (cycling through them in a random order),
      whose prompt replaces the planned one, H kept, h = k: the planned h if d has at least h user
      messages, else k ~ U{1..K_d}; so k ~ U{1..min(H, K_d)} (with ``turn_rule="last"``,
      k = min(H, K_d)). Source ``"dataset"``.

    The other points have source ``"initial"`` for ``rollin="initial"``, else ``"current"``.
    """
    source = "initial" if reset.rollin == "initial" else "current"
    order = rng.permutation(len(simulator.prompt_ids))
    points = []
    for index in range(n_pairs):
        prompt_id = simulator.prompt_ids[int(order[index % len(order)])]
        horizon = simulator.config.horizon or int(rng.integers(1, simulator.config.max_horizon + 1))
        turn = horizon if reset.turn_rule == "last" else int(rng.integers(1, horizon + 1))
        points.append(ResetPoint(prompt_id, horizon, turn, source))
    if reset.mixture == 0:
        return points
    mix = np.random.default_rng(int(rng.integers(2**63)))
    chosen = np.flatnonzero(mix.random(n_pairs) < reset.mixture)
    if reset.rollin == "initial":
        for index in chosen:
            points[index] = replace(points[index], turn=1, source="prompt")
        return points
    offline_order = mix.permutation(len(reset.offline))
    for rank, index in enumerate(chosen):
        dialogue = reset.offline[int(offline_order[rank % len(offline_order)])]
        points[index] = _dataset_point(points[index], dialogue, reset.turn_rule, mix)
    return points


def _dataset_point(
    point: ResetPoint, dialogue: OfflineDialogue, turn_rule: TurnRule, rng: np.random.Generator
) -> ResetPoint:
    """``point`` moved to the prefix s_k of ``dialogue``: k ~ U{1..min(H, K_d)}, or min(H, K_d) for "last"."""
    longest = min(point.horizon, dialogue.turns)
    if turn_rule == "last":
        turn = longest
    else:  # the planned h ~ U{1..H} if it is ≤ K_d, else a fresh draw: uniform on 1..min(H, K_d) either way
        turn = point.turn if point.turn <= longest else int(rng.integers(1, longest + 1))
    return replace(point, prompt_id=dialogue.prompt_id, turn=turn, source="dataset", offline=dialogue)
