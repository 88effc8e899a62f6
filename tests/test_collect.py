"""REFUEL pair collection with a tiny policy and user: shared s_h, distinct replies, drops, determinism."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from doubles import RecordingBackend, first_rows
from scipy import stats
from transformers import PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import TransformersBackend, load_tokenizer
from dialogsim.prompts import PromptRow
from dialogsim.rewards.math_reward import MathAnswerReward
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import UserSimulator
from refuel.collection.collect import CollectionResult, collect_pairs, iter_pair_batches
from refuel.collection.resets import ResetDistribution, plan_reset_points
from refuel.pairs import tokenize_pair

N_PAIRS = 4
MAX_HORIZON = 2
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=8)
Parts = tuple[list[PromptRow], UserSimulator, MathAnswerReward]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str) -> PreTrainedTokenizerBase:
    """The policy's tokenizer (SmolLM2's, from the tiny model's folder)."""
    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def policy(tiny_model_path: str) -> TransformersBackend:
    """π_t: the tiny random Llama on the transformers backend."""
    return TransformersBackend(tiny_model_path)


@pytest.fixture(scope="module")
def parts(tiny_model_path: str, shared_prompts: Path) -> Parts:
    """Six real GSM8K rows, a tiny-model student user (8-token questions) and the math reward."""
    user = UserSimulator(
        TransformersBackend(tiny_model_path),
        "student",
        sampling=SamplingParams(temperature=0.01, max_new_tokens=8, repetition_penalty=1.2, stop=("?",)),
    )
    return first_rows(shared_prompts, 6, dataset="gsm8k"), user, MathAnswerReward()


def _simulator(parts: Parts, tokenizer: PreTrainedTokenizerBase, max_horizon: int) -> DialogueSimulator:
    """A simulator over the parts with H drawn uniformly from 1..max_horizon."""
    rows, user, reward = parts
    return DialogueSimulator(rows, user, reward, EpisodeConfig(max_horizon=max_horizon), tokenizer)


@pytest.fixture(scope="module")
def simulator(parts: Parts, tokenizer: PreTrainedTokenizerBase) -> DialogueSimulator:
    """The simulator of the collection tests (max_horizon 2)."""
    return _simulator(parts, tokenizer, MAX_HORIZON)


@pytest.fixture(scope="module")
def collected(simulator: DialogueSimulator, policy: TransformersBackend) -> CollectionResult:
    """Four reset points tried with seed 0."""
    return collect_pairs(simulator, policy, N_PAIRS, SAMPLING, seed=0)


def test_collected_pairs_share_s_h_and_differ_at_turn_h(
    collected: CollectionResult, simulator: DialogueSimulator, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Kept pairs share s_h, differ at the turn-h reply, run to the horizon, restore and tokenise."""
    assert collected.pairs, f"no pair kept (dropped {dict(collected.dropped)}); the checks below would be vacuous"
    assert len(collected.pairs) + sum(collected.dropped.values()) == N_PAIRS
    assert set(collected.dropped) <= {"identical_replies", "truncated", "invalid_reward"}
    token_stats: Counter[str] = Counter()
    for pair in collected.pairs:
        h, horizon = pair["turn"], pair["horizon"]
        assert 1 <= h <= horizon <= MAX_HORIZON
        assert (pair["reset_source"], pair["offline_id"]) == ("current", "")  # the default: roll-in with π_t
        dialogue, dialogue_prime = pair["dialogue"], pair["dialogue_prime"]
        state = dialogue[: 2 * h - 1]
        assert dialogue_prime[: 2 * h - 1] == state  # the shared state s_h
        assert state[-1]["role"] == "user" and sum(m["role"] == "user" for m in state) == h
        assert state[0]["content"] == simulator.prompts[pair["prompt_id"]].instruction
        assert dialogue[2 * h - 1]["role"] == dialogue_prime[2 * h - 1]["role"] == "assistant"
        assert dialogue[2 * h - 1]["content"] != dialogue_prime[2 * h - 1]["content"]  # a_h ≠ a'_h
        assert pair["token_ids"] != pair["token_ids_prime"]
        for messages in (dialogue, dialogue_prime):  # complete episodes: exactly H replies, ending on one
            assert sum(m["role"] == "assistant" for m in messages) == horizon
            assert len(messages) == 2 * horizon and messages[-1]["role"] == "assistant"
        assert math.isfinite(pair["reward"]) and math.isfinite(pair["reward_prime"])
        # the rewards are the reward model's scores of the complete dialogues
        row = simulator.prompts[pair["prompt_id"]]
        rescored = simulator.reward.score([dialogue, dialogue_prime], [row, row])
        assert [pair["reward"], pair["reward_prime"]] == pytest.approx(rescored, abs=1e-5)
        snapshot = json.loads(pair["snapshot_json"])
        restored = simulator.restore(snapshot)
        assert restored.messages == state
        assert (restored.turn, restored.horizon, restored.prompt_id) == (h, horizon, pair["prompt_id"])
        features, counts = tokenize_pair(pair, tokenizer)  # raises if the ids disagree with the template
        token_stats.update(counts)
        assert features["input_ids"][: len(pair["prompt_token_ids"])] == pair["prompt_token_ids"]
        assert sum(features["loss_mask"]) == len(pair["token_ids"])
        assert sum(features["loss_mask_prime"]) == len(pair["token_ids_prime"])
    assert sum(token_stats.values()) == 2 * len(collected.pairs)


def test_collect_pairs_is_deterministic_given_the_seed(
    collected: CollectionResult, simulator: DialogueSimulator, policy: TransformersBackend
) -> None:
    """The same seed gives identical pairs (ids, dialogues, rewards, snapshots) and identical drops."""
    again = collect_pairs(simulator, policy, N_PAIRS, SAMPLING, seed=0)
    assert again.pairs == collected.pairs
    assert again.dropped == collected.dropped


def test_greedy_replies_are_dropped_as_identical(simulator: DialogueSimulator, policy: TransformersBackend) -> None:
    """With greedy decoding y = y' at every reset point, so every pair is dropped as identical_replies."""
    result = collect_pairs(simulator, policy, N_PAIRS, SamplingParams(temperature=0.0, max_new_tokens=8), seed=0)
    assert result.pairs == []
    assert result.dropped == Counter({"identical_replies": N_PAIRS})


def test_horizon_and_reset_turn_are_uniform(parts: Parts, tokenizer: PreTrainedTokenizerBase) -> None:
    """Over 300 start states H is uniform on {1, 2, 3} and h uniform on 1..H (chi-square, p > 0.001)."""
    simulator = _simulator(parts, tokenizer, max_horizon=3)
    points = plan_reset_points(simulator, 300, np.random.default_rng(0))
    horizons, turns = [p.horizon for p in points], [p.turn for p in points]
    assert all(1 <= p.turn <= p.horizon <= 3 for p in points)
    horizon_counts = [horizons.count(value) for value in (1, 2, 3)]
    assert stats.chisquare(horizon_counts).pvalue > 1e-3, horizon_counts
    pairs = Counter(zip(horizons, turns, strict=True))  # (H, h) → count
    for horizon in (2, 3):
        turn_counts = [pairs[horizon, turn] for turn in (1, 2, 3)]
        assert stats.chisquare(turn_counts[:horizon]).pvalue > 1e-3, (horizon, turn_counts)
        assert turn_counts[horizon:] == [0] * (3 - horizon)
    # prompts are drawn without replacement, cycling: each block of 6 points covers all 6 prompts
    n_prompts = len(simulator.prompt_ids)
    for start in range(0, 300 - n_prompts + 1, n_prompts):
        assert {p.prompt_id for p in points[start : start + n_prompts]} == set(simulator.prompt_ids)
    # the last-turn baselines reset at h = H
    assert all(
        p.turn == p.horizon
        for p in plan_reset_points(simulator, 50, np.random.default_rng(1), ResetDistribution(turn_rule="last"))
    )


@pytest.mark.slow
def test_one_policy_call_per_round_for_rollins_branches_and_rollouts(
    simulator: DialogueSimulator, policy: TransformersBackend
) -> None:
    """A batch needs max(H) rounds, each one policy call over every active conversation of every pair."""
    counting = RecordingBackend(policy)
    collect_pairs(simulator, counting, N_PAIRS, SAMPLING, seed=0)
    points = plan_reset_points(simulator, N_PAIRS, np.random.default_rng(0))
    assert len(counting.calls) == max(point.horizon for point in points)
    conversations = sum(len(call) for call in counting.turns())
    # each pair: h − 1 roll-in replies, then 2 × (H − h + 1) branch replies (unless its roll-in was truncated)
    assert conversations <= sum(point.turn - 1 + 2 * (point.horizon - point.turn + 1) for point in points)


@pytest.mark.slow
def test_rollin_policy_generates_turns_before_h_only(simulator: DialogueSimulator, policy: TransformersBackend) -> None:
    """With a separate roll-in policy (π_ref), it answers turns < h; π_t answers turn h and after."""
    rollin, learner = RecordingBackend(policy), RecordingBackend(policy)
    result = collect_pairs(
        simulator, learner, 6, SAMPLING, seed=3, reset=ResetDistribution.last_turn(), initial_policy=rollin
    )
    turns = [turn for call in rollin.turns() for turn in call]
    assert turns, "some pair should have h > 1"
    for pair in result.pairs:
        assert pair["turn"] == pair["horizon"]  # reset at the last turn
        assert pair["reset_source"] == "initial"  # π_ref roll-ins
    assert len(learner.calls) >= 1 and all(len(call) % 2 == 0 for call in learner.turns()), "y and y' together"
    assert max(turns) < max(turn for call in learner.turns() for turn in call)


@pytest.mark.slow
def test_any_batch_reruns_alone_exactly(simulator: DialogueSimulator, policy: TransformersBackend) -> None:
    """Batch b depends only on (seed, b): skipping batch 0 (already on disk) leaves batch 1 unchanged."""
    full = dict(iter_pair_batches(simulator, policy, N_PAIRS, SAMPLING, seed=5, batch_size=2))
    resumed = dict(iter_pair_batches(simulator, policy, N_PAIRS, SAMPLING, seed=5, batch_size=2, skip=frozenset({0})))
    assert list(full) == [0, 1] and list(resumed) == [1]
    assert resumed[1].pairs == full[1].pairs and resumed[1].dropped == full[1].dropped


@pytest.mark.slow
def test_a_resumed_collection_counts_only_the_batches_it_runs(
    simulator: DialogueSimulator, policy: TransformersBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    """With batch 0 on disk, the progress bar runs over the one batch left (1/1), not 2/2 (its rate would lie)."""
    capsys.readouterr()
    list(iter_pair_batches(simulator, policy, N_PAIRS, SAMPLING, seed=5, batch_size=2, skip=frozenset({0})))
    err = capsys.readouterr().err
    assert "1/1" in err and "2/2" not in err
