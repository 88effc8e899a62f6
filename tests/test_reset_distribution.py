"""Reset distributions in REFUEL collection: roll-in with π_t, with π_ref mixed with prompt starts (β),
or resets to prefixes of offline dialogues (w); settings, plans, pair rows, and the real env path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from doubles import RecordingBackend, first_rows
from scipy import stats

from dialogsim.backends.transformers_backend import TransformersBackend, load_tokenizer
from dialogsim.messages import Message
from dialogsim.prompts import OfflineDialogue, PromptRow
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import UserSimulator, render_user_prompt
from envs.tabular import PROMPT_ID, TabularDialogueMDP, TabularPolicy, build_tabular_simulator, reference_logits
from refuel.collection.collect import collect_pairs, iter_pair_batches, sample_offline_dialogues
from refuel.collection.resets import RESET_SOURCES, ResetDistribution, plan_reset_points
from refuel.pairs import tokenize_pair
from refuel.tabular.mirror_descent import TABLE_SAMPLING

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mdp() -> TabularDialogueMDP:
    """The clarify-first MDP on the 43-state dialogue tree."""
    return TabularDialogueMDP.clarify_first(memory="dialogue")


@pytest.fixture(scope="module")
def table_simulator(mdp: TabularDialogueMDP) -> DialogueSimulator:
    """The tabular simulator, H ~ U{1, 2, 3}."""
    return build_tabular_simulator(mdp)


@pytest.fixture(scope="module")
def demonstrations(mdp: TabularDialogueMDP, table_simulator: DialogueSimulator) -> list[OfflineDialogue]:
    """32 dialogues of a demonstrator that asks first (a0) and then answers (a1), to turn 3."""
    demonstrator = TabularPolicy(mdp, reference_logits(mdp, (0.98, 0.01, 0.01)), name="demonstrator")
    return sample_offline_dialogues(table_simulator, demonstrator, 32, TABLE_SAMPLING, seed=7)


# ---- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"rollin": "teacher"}, ValueError, "rollin must be one of"),
        ({"rollin": "initial", "beta": 1.5}, ValueError, r"beta must be a probability in \[0, 1\]"),
        ({"rollin": "initial", "beta": -0.1}, ValueError, "beta must be a probability"),
        ({"rollin": "initial", "beta": float("nan")}, ValueError, "beta must be a probability"),
        ({"rollin": "current", "beta": 0.5}, ValueError, "applies to rollin='initial' only"),
        ({"rollin": "dataset", "dataset_weight": 2.0, "offline": "x"}, ValueError, "dataset_weight must be"),
        ({"rollin": "initial", "dataset_weight": 0.5}, ValueError, "applies to rollin='dataset' only"),
        ({"rollin": "dataset", "dataset_weight": 0.5}, ValueError, "needs offline dialogues"),
        ({"rollin": "current", "offline": ["x"]}, ValueError, "offline dialogues apply to rollin='dataset'"),
        ({"rollin": "dataset", "dataset_weight": 0.5, "offline": ["x"]}, TypeError, "offline\\[0\\]"),
    ],
)
def test_bad_settings_raise_clear_errors(settings: dict[str, Any], error: type, message: str) -> None:
    """Unknown roll-ins, probabilities outside [0, 1], and settings of another roll-in are refused."""
    with pytest.raises(error, match=message):
        ResetDistribution(**settings)


def test_collection_checks_the_reset_against_its_backends(
    mdp: TabularDialogueMDP, table_simulator: DialogueSimulator, demonstrations: list[OfflineDialogue]
) -> None:
    """π_ref is required for rollin='initial' and refused otherwise; offline prompts must be known."""
    policy, reference = TabularPolicy(mdp), TabularPolicy(mdp, name="reference")
    cases = [
        ({"reset": ResetDistribution("initial", beta=0.5)}, "pass its backend as initial_policy"),
        ({"reset": ResetDistribution(), "initial_policy": reference}, "initial_policy must be None"),
        (
            {"reset": ResetDistribution("dataset", 0.0, 0.5, demonstrations), "initial_policy": reference},
            "initial_policy must be None",
        ),
    ]
    foreign = OfflineDialogue("foreign", "no-such-prompt", ({"role": "user", "content": "u0"},))
    cases.append(({"reset": ResetDistribution("dataset", dataset_weight=0.5, offline=[foreign])}, "foreign"))
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            iter_pair_batches(table_simulator, policy, 4, TABLE_SAMPLING, seed=0, **kwargs)


# ---- β: prompt starts and π_ref roll-ins ----------------------------------------------------------


def _reference_run(
    mdp: TabularDialogueMDP, simulator: DialogueSimulator, beta: float, n_pairs: int = 48
) -> tuple[list[dict[str, Any]], RecordingBackend, RecordingBackend, Counter[str]]:
    """Collect with π_ref = the base table (β given) and count both backends' calls."""
    learner = RecordingBackend(TabularPolicy(mdp, reference_logits(mdp, (0.3, 0.3, 0.4))))
    reference = RecordingBackend(TabularPolicy(mdp, name="reference"))
    reset = ResetDistribution("initial", beta=beta)
    result = collect_pairs(
        simulator, learner, n_pairs, TABLE_SAMPLING, seed=2, batch_size=16, reset=reset, initial_policy=reference
    )
    return result.pairs, learner, reference, result.sources


def test_beta_one_gives_only_prompt_starts(mdp: TabularDialogueMDP, table_simulator: DialogueSimulator) -> None:
    """β = 1: every pair starts at the prompt (h = 1, reset_source 'prompt') and π_ref is never called."""
    pairs, learner, reference, sources = _reference_run(mdp, table_simulator, beta=1.0)
    assert pairs and sources == Counter({"prompt": 48})
    assert {(pair["reset_source"], pair["turn"], pair["offline_id"]) for pair in pairs} == {("prompt", 1, "")}
    assert reference.calls == [] and learner.calls


def test_beta_zero_gives_only_initial_rollins(mdp: TabularDialogueMDP, table_simulator: DialogueSimulator) -> None:
    """β = 0: every pair rolls in with π_ref (turns < h), π_t answers from turn h on."""
    pairs, learner, reference, sources = _reference_run(mdp, table_simulator, beta=0.0)
    assert sources == Counter({"initial": 48}) and {pair["reset_source"] for pair in pairs} == {"initial"}
    rolled_in = sum(pair["turn"] - 1 for pair in pairs)
    assert rolled_in > 0 and sum(len(call) for call in reference.turns()) >= rolled_in
    learner_turns = Counter(turn for call in learner.turns() for turn in call)
    reference_turns = Counter(turn for call in reference.turns() for turn in call)
    assert max(reference_turns) < table_simulator.config.max_horizon and 1 in learner_turns


def test_beta_mixes_prompt_starts_into_the_same_plan(table_simulator: DialogueSimulator) -> None:
    """β = 0.3: about 30 % prompt starts (binomial test); the other points are the β = 0 plan's points."""
    plan = {
        beta: plan_reset_points(
            table_simulator, 600, np.random.default_rng(4), reset=ResetDistribution("initial", beta=beta)
        )
        for beta in (0.0, 0.3)
    }
    prompt_starts = [i for i, point in enumerate(plan[0.3]) if point.source == "prompt"]
    assert stats.binomtest(len(prompt_starts), 600, 0.3).pvalue > 1e-3
    for index, (mixed, base) in enumerate(zip(plan[0.3], plan[0.0], strict=True)):
        expected = (1, "prompt") if index in prompt_starts else (base.turn, "initial")
        assert (mixed.prompt_id, mixed.horizon, mixed.turn, mixed.source) == (base.prompt_id, base.horizon, *expected)


# ---- dataset resets --------------------------------------------------------------------------------


def test_dataset_plan_draws_prefixes_uniformly(table_simulator: DialogueSimulator) -> None:
    """w = 0.4: ~40 % dataset points, k ~ U{1..min(H, K_d)}, k = min(H, K_d) for 'last'; others unchanged."""
    user = [{"role": "user", "content": "u0"}, {"role": "assistant", "content": "a0"}]
    short = OfflineDialogue("short", PROMPT_ID, (user[0],))  # K = 1
    long = OfflineDialogue("long", PROMPT_ID, (*user, {"role": "user", "content": "u1"}, user[1], user[0]))  # K = 3
    reset = ResetDistribution("dataset", dataset_weight=0.4, offline=(short, long))
    points = plan_reset_points(table_simulator, 900, np.random.default_rng(5), reset=reset)
    base = plan_reset_points(table_simulator, 900, np.random.default_rng(5))
    chosen = [(p, b) for p, b in zip(points, base, strict=True) if p.source == "dataset"]
    assert stats.binomtest(len(chosen), 900, 0.4).pvalue > 1e-3
    assert all(p == b for p, b in zip(points, base, strict=True) if p.source == "current")
    used = Counter(p.offline.id for p, _ in chosen)
    assert set(used) == {"short", "long"} and abs(used["short"] - used["long"]) <= 1  # cycling through them
    for point, planned in chosen:
        assert point.horizon == planned.horizon and 1 <= point.turn <= min(point.horizon, point.offline.turns)
        if point.offline.id == "long":
            assert point.turn == planned.turn  # K_d ≥ H: the planned h is kept
    long_h3 = [p.turn for p, _ in chosen if p.offline.id == "long" and p.horizon == 3]
    assert stats.chisquare([long_h3.count(k) for k in (1, 2, 3)]).pvalue > 1e-3
    last = plan_reset_points(
        table_simulator,
        60,
        np.random.default_rng(6),
        ResetDistribution("dataset", dataset_weight=1.0, offline=(short, long), turn_rule="last"),
    )
    assert all(p.turn == min(p.horizon, p.offline.turns) for p in last)


def test_dataset_batches_rerun_alone_exactly(
    mdp: TabularDialogueMDP, table_simulator: DialogueSimulator, demonstrations: list[OfflineDialogue]
) -> None:
    """With dataset resets batch b still depends only on (seed, b): skipping batch 0 leaves the rest unchanged."""
    reset = ResetDistribution("dataset", dataset_weight=0.5, offline=demonstrations)
    policy = TabularPolicy(mdp)
    full = dict(iter_pair_batches(table_simulator, policy, 48, TABLE_SAMPLING, seed=3, batch_size=16, reset=reset))
    resumed = dict(
        iter_pair_batches(
            table_simulator, policy, 48, TABLE_SAMPLING, seed=3, batch_size=16, skip=frozenset({0}), reset=reset
        )
    )
    assert list(full) == [0, 1, 2] and list(resumed) == [1, 2]
    for index in (1, 2):
        assert resumed[index].pairs == full[index].pairs and resumed[index].sources == full[index].sources
    sources = sum((batch.sources for batch in full.values()), Counter())
    assert set(sources) == {"current", "dataset"} and sum(sources.values()) == 48
    recorded = {pair["reset_source"] for batch in full.values() for pair in batch.pairs}
    assert recorded == set(sources) and recorded <= set(RESET_SOURCES)


def test_sampled_offline_dialogues_reach_the_last_turn(
    mdp: TabularDialogueMDP, demonstrations: list[OfflineDialogue]
) -> None:
    """Demonstrations end with the user message of turn max_horizon and are the demonstrator's (a0 first)."""
    assert len(demonstrations) == 32 and len({d.id for d in demonstrations}) == 32
    for dialogue in demonstrations:
        assert dialogue.prompt_id == PROMPT_ID and dialogue.turns == mdp.max_horizon
        assert dialogue.messages[-1]["role"] == "user" and mdp.state_index(list(dialogue.messages)) >= 0
    assert Counter(d.messages[1]["content"] for d in demonstrations).most_common(1)[0][0] == "a0"


# ---- the real LLM path: a dataset reset restores the prefix, the simulated user continues ----------


class ConstantReward:
    """Reward 0 for every dialogue (these tests look at the dialogues, not the scores)."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        return [0.0] * len(dialogues)


def _offline(row: PromptRow) -> OfflineDialogue:
    """A three-turn offline dialogue of ``row`` whose own later messages are recognisable."""
    texts = [row.instruction, "OFFLINE reply 1.", "OFFLINE question 2?", "OFFLINE reply 2.", "OFFLINE question 3?"]
    messages = tuple({"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(texts))
    return OfflineDialogue(f"offline-{row.id[:8]}", row.id, messages)  # type: ignore[arg-type]


def test_dataset_reset_restores_the_prefix_and_the_user_continues(tiny_model_path: str, shared_prompts: Path) -> None:
    """w = 1 on the tiny LLM: s_h is the offline prefix s_k exactly (h = k), π_t answers it, and every later
    user message comes from the simulated user (a call on the rendered dialogue), never from the offline data."""
    rows = first_rows(shared_prompts, 6, dataset="gsm8k")
    user_backend = RecordingBackend(TransformersBackend(tiny_model_path))
    user = UserSimulator(
        user_backend, "student", SamplingParams(temperature=0.01, max_new_tokens=8, repetition_penalty=1.2)
    )
    tokenizer = load_tokenizer(tiny_model_path)
    simulator = DialogueSimulator(rows, user, ConstantReward(), EpisodeConfig(max_horizon=3), tokenizer)
    offline = {dialogue.id: dialogue for dialogue in map(_offline, rows)}
    reset = ResetDistribution("dataset", dataset_weight=1.0, offline=tuple(offline.values()))
    policy = TransformersBackend(tiny_model_path)
    result = collect_pairs(
        simulator, policy, 6, SamplingParams(temperature=1.0, max_new_tokens=8), seed=1, batch_size=6, reset=reset
    )
    assert len(result.pairs) >= 4 and result.sources == Counter({"dataset": 6})
    assert max(pair["turn"] for pair in result.pairs) > 1, "some reset should be past the first turn"
    rendered = [conversation for call in user_backend.calls for conversation in call.conversations]
    token_stats: Counter[str] = Counter()
    for pair in result.pairs:
        h, source = pair["turn"], offline[pair["offline_id"]]
        assert pair["reset_source"] == "dataset" and pair["prompt_id"] == source.prompt_id
        assert json.loads(pair["snapshot_json"])["messages"] == source.prefix(h)
        for dialogue in (pair["dialogue"], pair["dialogue_prime"]):
            assert dialogue[: 2 * h - 1] == source.prefix(h) and len(dialogue) == 2 * pair["horizon"]
            for turn in range(h + 1, pair["horizon"] + 1):  # user messages after the reset: the simulator's
                question = dialogue[2 * turn - 2]
                assert question["role"] == "user" and not question["content"].startswith("OFFLINE")
                assert render_user_prompt(user.template, dialogue[: 2 * turn - 2]) in rendered
        token_stats.update(tokenize_pair(pair, tokenizer)[1])  # π_t's turn-h ids were generated from s_k's template
    assert sum(token_stats.values()) == 2 * len(result.pairs)
