"""Gymnasium environments: API conformance, snapshots, horizon and reward, truncation, the vector env."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from doubles import RecordingBackend
from gymnasium.utils.env_checker import check_env
from transformers import PreTrainedTokenizerBase

import envs
from dialogsim import arithmetic
from dialogsim.backends.base import Completion
from dialogsim.backends.transformers_backend import TransformersBackend, load_tokenizer
from dialogsim.data import load_prompts
from dialogsim.dialogue import SnapshotError
from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.math_reward import MathAnswerReward
from dialogsim.sampling import SEED_LIMIT, SamplingParams
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import ScriptError, UserSimulator, render_user_prompt
from envs import ENV_ID, DialogueEnv, VectorDialogueEnv
from envs.spaces import UnicodeText
from refuel.collection.rollout import PolicyRun, run_policies, run_policy

# Temperature 1.0 (not the paper's 0.01) so that the user model's raw reply depends on the sampling
# seed: restoring a snapshot must then restore the RNG for the replies to match.
USER_SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=4)
REPLY_A = "First, 48 / 2 = 24 clips in May."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rows(shared_prompts: Path) -> list[PromptRow]:
    return load_prompts(shared_prompts, tasks=["Math_CoT"], datasets=["gsm8k"], limit=5)[0]


@pytest.fixture(scope="module")
def user_backend(tiny_model_path: str) -> RecordingBackend:
    return RecordingBackend(TransformersBackend(tiny_model_path, dtype="float32"))


@pytest.fixture(scope="module")
def make_simulator(
    rows: list[PromptRow], user_backend: RecordingBackend, tiny_model_path: str
) -> Callable[..., DialogueSimulator]:
    """Simulators that share the prompts, the tiny user model, MiniLM and the tokenizer; kwargs go to EpisodeConfig."""
    user = UserSimulator(user_backend, "student", USER_SAMPLING)
    reward = MathAnswerReward()
    tokenizer: PreTrainedTokenizerBase = load_tokenizer(tiny_model_path)

    def make(**config: Any) -> DialogueSimulator:
        return DialogueSimulator(rows, user, reward, EpisodeConfig(**config), tokenizer)

    return make


@pytest.fixture(scope="module")
def sim(make_simulator: Callable[..., DialogueSimulator]) -> DialogueSimulator:
    """Horizon fixed at 3."""
    return make_simulator(max_horizon=3, horizon=3)


def _roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ---- single environment ---------------------------------------------------------------------


def test_check_env_passes(make_simulator: Callable[..., DialogueSimulator]) -> None:
    """gymnasium's check_env accepts DialogueEnv, with no warning other than the spec-less render-mode note."""
    env = DialogueEnv(simulator=make_simulator(max_horizon=2, horizon=2), max_reply_chars=200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    unexpected = [str(w.message) for w in caught if "alternative render modes" not in str(w.message)]
    assert unexpected == []


def test_gym_make_and_make_vec(sim: DialogueSimulator) -> None:
    """The registered id builds DialogueEnv with gym.make and VectorDialogueEnv with gym.make_vec."""
    assert envs.ENV_ID == ENV_ID == "dialogsim/UltraInteract-v0" and ENV_ID in gym.registry
    env = gym.make(ENV_ID, simulator=sim)
    assert isinstance(env.unwrapped, DialogueEnv) and env.unwrapped.simulator is sim
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and obs[-1]["role"] == "user"
    assert info["turn"] == 1 and info["horizon"] == 3 and info["prompt_id"] in sim.prompts
    venv = gym.make_vec(ENV_ID, num_envs=3, vectorization_mode="vector_entry_point", simulator=sim)
    assert isinstance(venv, VectorDialogueEnv) and venv.simulator is sim
    assert venv.num_envs == 3 and isinstance(venv.single_action_space, UnicodeText)
    obs, infos = venv.reset(seed=0)
    assert len(obs) == 3 and venv.observation_space.contains(obs)
    assert len(infos["snapshot"]) == 3 and infos["turn"].tolist() == [1, 1, 1]
    assert venv.action_space.contains(("a", "b", "c"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_horizon": 7}, "max_horizon=7 (valid: an integer ≥ 1 and ≤ 5)"),
        ({"max_horizon": 2, "horizon": 3}, "horizon=3 (valid: at most max_horizon"),
        ({"holdout": -1}, "holdout=-1 (valid: an integer ≥ 0)"),
        ({"max_dialogue_tokens": 0}, "max_dialogue_tokens=0 (valid: an integer ≥ 1)"),
        ({"tasks": "Math_CoT"}, "tasks='Math_CoT' (valid: a list of strings)"),
        ({"user_backend": "openai"}, "user_base_url=None (valid: the server's http(s) URL"),
    ],
)
def test_gym_make_refuses_an_out_of_range_setting_before_any_model_loads(
    settings: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gym.make's keyword arguments are checked as the commands' flags are (the ranges declared on the fields),
    before a name is looked up or a tokenizer, user or reward model loads."""
    import envs.build

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model or a name was looked up before the settings were checked")

    for name in ("check_model_name", "load_tokenizer", "build_backend", "build_reward_model", "load_prompt_rows"):
        monkeypatch.setattr(envs.build, name, no_loading)
    with pytest.raises(ValueError) as error:
        gym.make(ENV_ID, **settings)
    assert message in str(error.value)


def test_gym_make_refuses_an_unknown_setting() -> None:
    with pytest.raises(TypeError, match=r"unknown settings \['max_horizons'\]; valid: .*max_horizon"):
        gym.make(ENV_ID, max_horizons=2)


def test_snapshot_round_trip(sim: DialogueSimulator, user_backend: RecordingBackend) -> None:
    """A JSON round-tripped snapshot restores s_h exactly: same observation, same user RNG, same next question."""
    env = DialogueEnv(simulator=sim)
    env.reset(seed=3)
    obs_at_snapshot, _, _, _, info = env.step("Let me think about April first.")
    snapshot = env.snapshot()
    assert json.loads(info["snapshot"]) == snapshot and snapshot["turn"] == 2
    assert _roundtrip(snapshot) == snapshot

    obs_a, *_ = env.step(REPLY_A)
    original_call = user_backend.calls[-1]
    next_user_message = obs_a[-1]
    assert next_user_message["role"] == "user" and obs_a[-2] == {"role": "assistant", "content": REPLY_A}

    restored_obs, restored_info = env.reset(options={"snapshot": _roundtrip(snapshot)})
    assert restored_obs == obs_at_snapshot
    assert restored_info["turn"] == 2 and json.loads(restored_info["snapshot"]) == snapshot
    obs_b, *_ = env.step(REPLY_A)
    assert obs_b == obs_a
    assert user_backend.calls[-1].sampling.seeds == original_call.sampling.seeds
    assert user_backend.calls[-1].completions == original_call.completions

    other = DialogueEnv(simulator=sim)
    assert other.reset(options={"snapshot": snapshot})[0] == obs_at_snapshot
    obs_c, *_ = other.step(REPLY_A)
    assert obs_c == obs_a and user_backend.calls[-1].completions == original_call.completions

    # The equality above is not vacuous: another seed gives another raw user-model reply.
    reseeded = user_backend.inner.chat(original_call.conversations, _other_seeds(original_call.sampling))
    assert [c.token_ids for c in reseeded] != [c.token_ids for c in original_call.completions]


def _other_seeds(sampling: SamplingParams) -> SamplingParams:
    """``sampling`` with every per-conversation seed changed."""
    return sampling.with_seeds([(seed + 1) % SEED_LIMIT for seed in sampling.seeds or ()])


def test_branches_from_one_snapshot_draw_the_same_user_turn_in_any_batch(
    sim: DialogueSimulator, user_backend: RecordingBackend, rows: list[PromptRow]
) -> None:
    """Common random numbers: with a deterministic policy, both branches of a pair restored from one snapshot get
    the identical user-model draw and user turn, alone or together in a batch of 5 with other dialogues."""
    rng = np.random.default_rng(0)
    start = sim.new_state(rng, {"prompt_id": rows[0].id})
    sim.step([start], ["Let me think about April first."])
    snapshot = start.to_snapshot(sim.fingerprint)

    alone = sim.restore(snapshot)
    sim.step([alone], [REPLY_A])
    (alone_draw,) = user_backend.calls[-1].completions

    branch, branch_prime = sim.restore(snapshot), sim.restore(snapshot)
    others = [sim.new_state(rng, {"prompt_id": row.id}) for row in rows[1:4]]
    batch = [others[0], branch, others[1], branch_prime, others[2]]
    sim.step(
        batch, ["A longer reply to another problem, which pads the batch differently.", REPLY_A, "Hm.", REPLY_A, "Ok."]
    )
    call = user_backend.calls[-1]
    assert len(call.completions) == 5
    assert call.completions[1] == call.completions[3] == alone_draw
    assert branch.messages == branch_prime.messages == alone.messages
    assert branch.rng.bit_generator.state == branch_prime.rng.bit_generator.state == alone.rng.bit_generator.state
    # not vacuous: at temperature 1 the tiny user model's draw is the seed's, another seed draws another reply
    seeds = call.sampling.seeds or ()
    assert seeds[1] == seeds[3] and len(set(seeds)) == 4  # one seed per dialogue, drawn from its own RNG
    reseeded = user_backend.inner.chat(call.conversations[1:2], call.sampling.with_seeds([(seeds[1] + 1) % SEED_LIMIT]))
    assert reseeded[0].token_ids != alone_draw.token_ids


def test_restored_state_does_not_alias_the_snapshot(sim: DialogueSimulator) -> None:
    """Mutating a snapshot (or an observation) after restoring it does not change the environment."""
    env = DialogueEnv(simulator=sim)
    env.reset(seed=1)
    snapshot = env.snapshot()
    obs, _ = env.reset(options={"snapshot": snapshot})
    snapshot["messages"][0]["content"] = "changed"
    obs[0]["content"] = "changed too"
    assert env.snapshot()["messages"][0]["content"] == sim.prompts[snapshot["prompt_id"]].instruction


def test_reward_at_the_horizon(make_simulator: Callable[..., DialogueSimulator], rows: list[PromptRow]) -> None:
    """H=2: turn 1 gives reward 0 and a user question; turn 2 terminates with the reward model's score."""
    sim = make_simulator(max_horizon=2, horizon=2)
    row = rows[0]
    env = DialogueEnv(simulator=sim)
    obs, info = env.reset(seed=0, options={"prompt_id": row.id})
    assert obs == ({"role": "user", "content": row.instruction},) and (info["turn"], info["horizon"]) == (1, 2)

    obs, reward, terminated, truncated, info = env.step("Let me work it out.")
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert len(obs) == 3 and obs[-1]["role"] == "user" and obs[-1]["content"].strip()
    assert (info["turn"], info["replied_turn"]) == (2, 1) and "snapshot" in info
    snapshot = env.snapshot()

    correct = f"So she sold 48 + 24 clips. The answer is \\boxed{{{row.reference}}}."
    obs, reward_correct, terminated, truncated, info = env.step(correct)
    assert terminated and not truncated
    assert isinstance(reward_correct, float) and math.isfinite(reward_correct)
    assert obs[-1] == {"role": "assistant", "content": correct} and len(obs) == 4
    assert "snapshot" not in info
    assert reward_correct == pytest.approx(sim.reward.score([list(obs)], [row])[0], abs=1e-5)
    with pytest.raises(RuntimeError, match="ended"):
        env.step("One more thing.")
    with pytest.raises(SnapshotError, match="finished"):
        env.snapshot()

    env.reset(options={"snapshot": snapshot})
    wrong = f"So she sold 48 + 24 clips. The answer is \\boxed{{{int(row.reference) + 1}}}."
    _, reward_wrong, terminated, _, _ = env.step(wrong)
    assert terminated and math.isfinite(reward_wrong)
    assert reward_correct - reward_wrong > 0.5


@pytest.mark.parametrize("action", [42, None, b"x", ["a reply"]])
def test_non_string_action_is_a_type_error(sim: DialogueSimulator, action: Any) -> None:
    """A reply that is not a str raises TypeError naming its type, and leaves the dialogue unchanged."""
    env = DialogueEnv(simulator=sim)
    obs, _ = env.reset(seed=0)
    with pytest.raises(TypeError, match=type(action).__name__):
        env.step(action)
    assert env.state is not None and len(env.state.messages) == len(obs)


def test_too_long_action_is_a_value_error(sim: DialogueSimulator) -> None:
    """A reply longer than max_reply_chars raises ValueError giving its length."""
    env = DialogueEnv(simulator=sim, max_reply_chars=10)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="11 characters"):
        env.step("x" * 11)


def test_step_before_reset_is_a_runtime_error(sim: DialogueSimulator) -> None:
    """step() before reset() raises RuntimeError asking for reset()."""
    with pytest.raises(RuntimeError, match="reset"):
        DialogueEnv(simulator=sim).step("hello")


def test_unknown_prompt_id_is_a_key_error(sim: DialogueSimulator) -> None:
    """reset(options={"prompt_id": unknown}) raises KeyError naming the id."""
    with pytest.raises(KeyError, match="no-such-prompt"):
        DialogueEnv(simulator=sim).reset(options={"prompt_id": "no-such-prompt"})


def test_snapshot_from_another_configuration_is_rejected(
    sim: DialogueSimulator, make_simulator: Callable[..., DialogueSimulator]
) -> None:
    """A snapshot taken under another EpisodeConfig (another fingerprint) raises SnapshotError about the fingerprint."""
    env = DialogueEnv(simulator=sim)
    env.reset(seed=0)
    snapshot = env.snapshot()
    other = make_simulator(max_horizon=3, horizon=2)
    assert other.fingerprint != sim.fingerprint
    with pytest.raises(SnapshotError, match="fingerprint"):
        DialogueEnv(simulator=other).reset(options={"snapshot": snapshot})


def _pop(field: str) -> Callable[[dict[str, Any]], None]:
    return lambda snapshot: snapshot.pop(field)


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda snapshot: snapshot.__setitem__(field, value)


CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "missing turn": (_pop("turn"), "turn"),
    "missing rng_state": (_pop("rng_state"), "rng_state"),
    "missing messages": (_pop("messages"), "messages"),
    "ends with assistant": (
        lambda snapshot: snapshot["messages"].append({"role": "assistant", "content": "hi"}),
        r"snapshot\['messages'\]",
    ),
    "messages not a list": (_set("messages", "hello"), r"snapshot\['messages'\]"),
    "bad role": (_set("messages", [{"role": "robot", "content": "hi"}]), r"snapshot\['messages'\]"),
    "empty messages": (_set("messages", []), r"snapshot\['messages'\]"),
    "horizon zero": (_set("horizon", 0), r"snapshot\['horizon'\]"),
    "horizon too large": (_set("horizon", 9), r"snapshot\['horizon'\]"),
    "horizon not int": (_set("horizon", "3"), r"snapshot\['horizon'\]"),
    "rng_state garbage": (_set("rng_state", "garbage"), r"snapshot\['rng_state'\]"),
    "rng_state other generator": (_set("rng_state", {"bit_generator": "MT19937"}), r"snapshot\['rng_state'\]"),
    "rng_state incomplete": (_set("rng_state", {"bit_generator": "PCG64"}), r"snapshot\['rng_state'\]"),
    "wrong turn": (_set("turn", 2), r"snapshot\['turn'\]"),
    "version": (_set("version", 99), "version"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_snapshot_is_rejected(sim: DialogueSimulator, corruption: str) -> None:
    """A corrupted snapshot raises SnapshotError naming the offending field."""
    mutate, field = CORRUPTIONS[corruption]
    env = DialogueEnv(simulator=sim)
    env.reset(seed=0)
    snapshot = env.snapshot()
    mutate(snapshot)
    with pytest.raises(SnapshotError, match=field):
        env.reset(options={"snapshot": snapshot})


@pytest.mark.parametrize("snapshot", ["s_h", "[1, 2]", 42])
def test_non_dict_snapshot_is_rejected(sim: DialogueSimulator, snapshot: Any) -> None:
    """A snapshot that is neither a dict nor the JSON text of one raises SnapshotError saying what it should be."""
    with pytest.raises(SnapshotError, match="must be a dict"):
        DialogueEnv(simulator=sim).reset(options={"snapshot": snapshot})


def test_snapshot_with_unknown_prompt_id_is_a_snapshot_error(sim: DialogueSimulator) -> None:
    """A corrupted prompt_id is reported like the other corrupted fields."""
    env = DialogueEnv(simulator=sim)
    env.reset(seed=0)
    snapshot = env.snapshot() | {"prompt_id": "no-such-prompt"}
    with pytest.raises(SnapshotError, match="prompt_id"):
        env.reset(options={"snapshot": snapshot})


def test_truncation_on_the_token_budget(
    make_simulator: Callable[..., DialogueSimulator], rows: list[PromptRow]
) -> None:
    """Past max_dialogue_tokens the episode is truncated (not terminated) before the horizon, and scored."""
    row = rows[0]
    probe = make_simulator(max_horizon=3, horizon=3)
    first_turn: list[Message] = [{"role": "user", "content": row.instruction}, {"role": "assistant", "content": "OK."}]
    budget = len(probe.tokenizer.apply_chat_template(first_turn, tokenize=True, return_dict=False)) + 10
    env = DialogueEnv(simulator=make_simulator(max_horizon=3, horizon=3, max_dialogue_tokens=budget))
    env.reset(seed=0, options={"prompt_id": row.id})

    _, reward, terminated, truncated, info = env.step("OK.")
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["dialogue_tokens"] == budget - 10

    _, reward, terminated, truncated, info = env.step("Let me explain every single step again. " * 10)
    assert truncated and not terminated
    assert info["replied_turn"] == 2 < info["horizon"] == 3
    assert info["dialogue_tokens"] > budget
    assert isinstance(reward, float) and math.isfinite(reward)
    assert "snapshot" not in info
    with pytest.raises(RuntimeError):
        env.step("more")


# ---- Gymnasium's vector modes and wrappers ------------------------------------------------------


def test_sync_vector_mode_runs_an_episode_and_its_info_snapshots_restore_exactly(
    make_simulator: Callable[..., DialogueSimulator],
) -> None:
    """gym.make_vec(..., "sync") runs a 2-turn episode (with vector RecordEpisodeStatistics on top); a snapshot
    from its stacked info restores in a single env, whose next user turn (same user RNG) is the sync env's."""
    sim = make_simulator(max_horizon=2, horizon=2)
    venv = gym.wrappers.vector.RecordEpisodeStatistics(
        gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="sync", simulator=sim)
    )
    obs, infos = venv.reset(seed=0)
    assert infos["turn"].tolist() == [1, 1] and infos["snapshot"].dtype == object
    snapshot = infos["snapshot"][0]
    obs_1, rewards, terminated, truncated, infos = venv.step(("Let me think.", "Hm."))
    assert rewards.tolist() == [0.0, 0.0] and not (terminated | truncated).any()
    assert [len(dialogue) for dialogue in obs_1] == [3, 3] and obs_1[0][-1]["role"] == "user"

    env = DialogueEnv(simulator=sim)
    assert env.reset(options={"snapshot": snapshot})[0] == obs[0]
    assert env.step("Let me think.")[0] == obs_1[0]

    _, rewards, terminated, truncated, infos = venv.step(("The answer is 72.", "72"))
    assert terminated.tolist() == [True, True] and not truncated.any() and np.isfinite(rewards).all()
    assert "snapshot" not in infos, "no snapshot once the episodes have ended"
    assert infos["episode"]["l"].tolist() == [2, 2] and infos["episode"]["r"].tolist() == rewards.tolist()


def test_async_vector_mode_by_default_says_what_to_use(make_simulator: Callable[..., DialogueSimulator]) -> None:
    """gym.make_vec(..., "async") without vector_kwargs stops with our message: pass shared_memory=False, or use
    the vector_entry_point mode (Gymnasium's registry cannot supply vector_kwargs for the async mode alone)."""
    with pytest.raises(TypeError, match=r"shared_memory': False.*vector_entry_point"):
        gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="async", simulator=make_simulator(max_horizon=2))


@pytest.mark.slow
def test_async_vector_mode_without_shared_memory_runs_an_episode(tiny_model_path: str, shared_prompts: Path) -> None:
    """With vector_kwargs={"shared_memory": False, "context": "spawn"}, 2 worker processes, each building its env
    (and models) from the kwargs, run a 2-turn episode; a snapshot from their info restores exactly in this process."""
    kwargs = {
        "prompts": shared_prompts,
        "datasets": ["gsm8k"],
        "limit": 5,
        "policy_model": tiny_model_path,
        "user_model": tiny_model_path,
        "reward": "math_format",
        "max_horizon": 2,
        "horizon": 2,
    }
    venv = gym.make_vec(
        ENV_ID,
        num_envs=2,
        vectorization_mode="async",
        vector_kwargs={"shared_memory": False, "context": "spawn"},
        **kwargs,
    )
    try:
        obs, infos = venv.reset(seed=0)
        snapshots = infos["snapshot"]
        obs_1, rewards, terminated, truncated, _ = venv.step(("Let me think.", "Hm."))
        assert rewards.tolist() == [0.0, 0.0] and not (terminated | truncated).any()
        assert [len(dialogue) for dialogue in obs_1] == [3, 3] and obs_1[1][-1]["role"] == "user"
        _, rewards, terminated, truncated, infos = venv.step(("The answer is 72.", "72"))
        assert terminated.tolist() == [True, True] and not truncated.any() and np.isfinite(rewards).all()
    finally:
        venv.close()
    env = gym.make(ENV_ID, **kwargs)
    assert env.reset(options={"snapshot": snapshots[1]})[0] == obs[1]
    assert env.step("Hm.")[0] == obs_1[1], "same user turn as the worker's: the user RNG travelled in the snapshot"


def test_single_env_wrappers_record_episode_statistics_and_time_limit(
    make_simulator: Callable[..., DialogueSimulator],
) -> None:
    """RecordEpisodeStatistics reports a 2-turn episode's return and length; max_episode_steps=1 (TimeLimit)
    truncates after one reply, leaving a snapshot in info from which the dialogue goes on."""
    sim = make_simulator(max_horizon=2, horizon=2)
    env = gym.wrappers.RecordEpisodeStatistics(gym.make(ENV_ID, simulator=sim))
    env.reset(seed=0)
    env.step("Let me think.")
    _, reward, terminated, _, info = env.step("The answer is 72.")
    assert terminated and (info["episode"]["r"], info["episode"]["l"]) == (reward, 2)

    limited = gym.make(ENV_ID, simulator=sim, max_episode_steps=1)
    limited.reset(seed=0)
    obs, reward, terminated, truncated, info = limited.step("Let me think.")
    assert truncated and not terminated and reward == 0.0 and info["turn"] == 2
    resumed = DialogueEnv(simulator=sim)
    assert resumed.reset(options={"snapshot": info["snapshot"]})[0] == obs
    assert resumed.step("The answer is 72.")[2], "the dialogue resumed from the snapshot ends at its horizon"


# ---- vector environment ---------------------------------------------------------------------


def test_vector_step_makes_one_user_call(sim: DialogueSimulator, user_backend: RecordingBackend) -> None:
    """Each step makes one user-model call for all unfinished dialogues; ended ones autoreset on the next step."""
    venv = VectorDialogueEnv(3, simulator=sim)
    prompt_ids = sim.prompt_ids[:3]
    obs, infos = venv.reset(seed=0, options={"horizons": [1, 2, 3], "prompt_ids": prompt_ids})
    assert infos["horizon"].tolist() == [1, 2, 3] and infos["turn"].tolist() == [1, 1, 1]
    assert infos["prompt_id"].tolist() == prompt_ids

    user_backend.calls.clear()
    obs, rewards, terminated, truncated, infos = venv.step(["a", "b", "c"])
    assert len(user_backend.calls) == 1
    template = sim.user.template
    assert user_backend.calls[0].conversations == [render_user_prompt(template, list(obs[i][:-1])) for i in (1, 2)]
    assert rewards.shape == terminated.shape == truncated.shape == (3,)
    assert rewards.dtype == np.float64 and terminated.dtype == truncated.dtype == np.bool_
    assert terminated.tolist() == [True, False, False] and not truncated.any()
    assert math.isfinite(rewards[0]) and rewards[1:].tolist() == [0.0, 0.0]
    assert infos["snapshot"][0] is None and all(isinstance(s, str) for s in infos["snapshot"][1:])
    assert [len(o) for o in obs] == [2, 3, 3]

    user_backend.calls.clear()
    obs, rewards, terminated, truncated, infos = venv.step(["ignored", "b2", "c2"])
    assert len(user_backend.calls) == 1 and len(user_backend.calls[0].conversations) == 1
    assert len(obs[0]) == 1 and obs[0][0]["role"] == "user", "env 0 autoreset to a new s_1"
    assert (rewards[0], terminated[0], truncated[0]) == (0.0, False, False)
    assert infos["turn"].tolist() == [1, 2, 3] and infos["horizon"][0] == sim.config.horizon
    assert terminated.tolist() == [False, True, False] and math.isfinite(rewards[1]) and rewards[2] == 0.0

    user_backend.calls.clear()
    obs, rewards, terminated, truncated, infos = venv.step(["a3", "ignored", "c3"])
    assert len(user_backend.calls) == 1 and len(user_backend.calls[0].conversations) == 1
    assert terminated.tolist() == [False, False, True] and len(obs[1]) == 1


def test_vector_snapshots_restore_each_env(sim: DialogueSimulator, user_backend: RecordingBackend) -> None:
    """reset(options={"snapshots": [...]}) restores every sub-env; the same replies then give the same dialogues."""
    venv = VectorDialogueEnv(3, simulator=sim)
    venv.reset(seed=2, options={"horizons": [3, 3, 3]})
    user_backend.calls.clear()
    obs_at_snapshot, _, _, _, infos = venv.step(["r0", "r1", "r2"])
    assert len(user_backend.calls) == 1 and len(user_backend.calls[0].conversations) == 3
    snapshots = [json.loads(text) for text in infos["snapshot"]]
    replies = ["A0", "A1", "A2"]
    obs_next, *_ = venv.step(replies)

    other = VectorDialogueEnv(3, simulator=sim)
    restored, restored_infos = other.reset(options={"snapshots": snapshots})
    assert restored == obs_at_snapshot
    assert [json.loads(text) for text in restored_infos["snapshot"]] == snapshots
    assert other.step(replies)[0] == obs_next

    obs, _ = venv.reset(options={"snapshots": [None, snapshots[1], None], "prompt_ids": [sim.prompt_ids[4]] * 3})
    assert obs[1] == obs_at_snapshot[1] and obs[0] == obs[2] == (
        {"role": "user", "content": sim.prompts[sim.prompt_ids[4]].instruction},
    )


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        (["a", "b"], "sequence of 3"),
        ("abc", "sequence of 3"),
        ([1, "b", "c"], r"actions\[0\].*int"),
        (["a", None, "c"], r"actions\[1\].*NoneType"),
    ],
)
def test_vector_bad_actions_are_type_errors(
    sim: DialogueSimulator, user_backend: RecordingBackend, actions: Any, message: str
) -> None:
    """A wrong number of actions or a non-str action raises TypeError before anything is generated."""
    venv = VectorDialogueEnv(3, simulator=sim)
    obs, _ = venv.reset(seed=0)
    user_backend.calls.clear()
    with pytest.raises(TypeError, match=message):
        venv.step(actions)
    assert user_backend.calls == []
    assert [len(state.messages) for state in venv.states if state is not None] == [len(o) for o in obs] == [1, 1, 1]


def test_vector_reset_uses_the_configured_horizon(sim: DialogueSimulator) -> None:
    """Without options['horizons'] every sub-env starts with the fixed EpisodeConfig.horizon, as DialogueEnv does."""
    assert sim.config.horizon == 3
    assert DialogueEnv(simulator=sim).reset(seed=0)[1]["horizon"] == 3
    venv = VectorDialogueEnv(3, simulator=sim)
    _, infos = venv.reset(seed=0)
    assert infos["horizon"].tolist() == [3, 3, 3]


def test_vector_disabled_autoreset_runs_a_masked_subset(sim: DialogueSimulator, user_backend: RecordingBackend) -> None:
    """With autoreset DISABLED, a masked reset starts some envs; ended and idle envs are not stepped."""
    venv = VectorDialogueEnv(3, simulator=sim, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    obs, infos = venv.reset(seed=0, options={"reset_mask": [True, True, False], "horizons": [1, 2, None]})
    assert obs[2] == () and infos["active"].tolist() == [True, True, False] and infos["snapshot"][2] is None
    user_backend.calls.clear()
    obs, rewards, terminated, _, infos = venv.step(["a", "b", "ignored"])
    assert len(user_backend.calls) == 1 and len(user_backend.calls[0].conversations) == 1  # env 1 only
    assert terminated.tolist() == [True, False, False] and infos["active"].tolist() == [False, True, False]
    ended = obs[0]
    snapshot = infos["snapshot"][1]
    obs, _ = venv.reset(options={"reset_mask": [False, False, True], "snapshots": [None, None, snapshot]})
    assert obs[0] == ended and obs[2] == obs[1], "env 0 stays ended; env 2 is a copy of env 1 at s_2"
    user_backend.calls.clear()
    obs, rewards, terminated, truncated, infos = venv.step(["ignored", "y", "y'"])
    assert obs[0] == ended and (rewards[0], terminated[0], truncated[0]) == (0.0, False, False)
    assert terminated.tolist() == [False, True, True] and not infos["active"].any()
    assert user_backend.calls == [], "every stepped dialogue reached its horizon: scored, no user turn"
    assert [m["content"] for m in obs[1][:3]] == [m["content"] for m in obs[2][:3]]


def test_vector_env_rejects_same_step_autoreset(sim: DialogueSimulator) -> None:
    """Only NEXT_STEP and DISABLED autoreset are implemented; others are refused at construction."""
    with pytest.raises(ValueError, match="autoreset_mode"):
        VectorDialogueEnv(2, simulator=sim, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


# ---- starting from a message prefix (dataset resets) -----------------------------------------------


def _prefix(sim: DialogueSimulator, prompt_id: str) -> list[Message]:
    """An offline-style prefix s_2 of the prompt: instruction, an assistant reply, a follow-up question."""
    return [
        {"role": "user", "content": sim.prompts[prompt_id].instruction},
        {"role": "assistant", "content": "She sold 24 clips in May."},
        {"role": "user", "content": "OFFLINE follow-up: and in April?"},
    ]


def test_prefix_reset_restores_it_and_the_simulated_user_continues(
    sim: DialogueSimulator, user_backend: RecordingBackend
) -> None:
    """reset(options={"prefix": s_k, "prompt_id": id}) observes exactly s_k at turn k; after the reply the
    next user message is the simulator's, from the rendered prefix + reply."""
    prompt_id = sim.prompt_ids[0]
    prefix = _prefix(sim, prompt_id)
    env = DialogueEnv(simulator=sim)
    obs, info = env.reset(seed=0, options={"prefix": prefix, "prompt_id": prompt_id})
    assert list(obs) == prefix and (info["turn"], info["horizon"], info["prompt_id"]) == (2, 3, prompt_id)
    assert DialogueEnv(simulator=sim).reset(options={"snapshot": info["snapshot"]})[0] == obs
    user_backend.calls.clear()
    obs, reward, terminated, _, info = env.step(REPLY_A)
    assert (reward, terminated, info["turn"]) == (0.0, False, 3)
    assert list(obs[:3]) == prefix and obs[3] == {"role": "assistant", "content": REPLY_A}
    (call,) = user_backend.calls
    assert call.conversations == [render_user_prompt(sim.user.template, [*prefix, obs[3]])]
    assert obs[4]["role"] == "user" and obs[4]["content"].strip()
    prefix[0]["content"] = "changed"  # the env holds a copy
    assert env.state is not None and env.state.messages[0]["content"] == sim.prompts[prompt_id].instruction


def test_vector_env_prefixes(make_simulator: Callable[..., DialogueSimulator]) -> None:
    """options["prefixes"] starts the sub-environments that have one from it, the others from their prompt;
    without a horizon, H is drawn from k..max_horizon."""
    sim = make_simulator(max_horizon=3)
    ids = sim.prompt_ids[:3]
    venv = VectorDialogueEnv(3, simulator=sim)
    prefixes = [_prefix(sim, ids[0]), None, _prefix(sim, ids[2])[:1]]
    obs, infos = venv.reset(seed=0, options={"prefixes": prefixes, "prompt_ids": ids, "horizons": [2, None, None]})
    assert list(obs[0]) == prefixes[0] and list(obs[2]) == prefixes[2]
    assert obs[1] == ({"role": "user", "content": sim.prompts[ids[1]].instruction},)
    assert infos["turn"].tolist() == [2, 1, 1] and infos["horizon"][0] == 2
    horizons = {
        VectorDialogueEnv(1, simulator=sim).reset(
            seed=seed, options={"prefixes": [prefixes[0]], "prompt_ids": ids[:1]}
        )[1]["horizon"][0]
        for seed in range(20)
    }
    assert horizons == {2, 3}


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda options: options.pop("prompt_id"), ValueError, "needs options\\['prompt_id'\\]"),
        (lambda options: options["prefix"].pop(), ValueError, "must end with a user message"),
        (lambda options: options.__setitem__("prompt_id", "other"), KeyError, "other"),
        (lambda options: options["prefix"][0].__setitem__("content", "Hi"), ValueError, "not the instruction"),
        (lambda options: options["prefix"][1].__setitem__("role", "user"), ValueError, "alternate"),
        (lambda options: options.__setitem__("horizon", 1), ValueError, "horizon"),
    ],
)
def test_bad_prefix_is_rejected(sim: DialogueSimulator, change: Callable, error: type, message: str) -> None:
    """A prefix without its prompt, of another prompt, ending with a reply, out of order or too long is refused."""
    options: dict[str, Any] = {"prefix": _prefix(sim, sim.prompt_ids[0]), "prompt_id": sim.prompt_ids[0]}
    change(options)
    with pytest.raises(error, match=message):
        DialogueEnv(simulator=sim).reset(seed=0, options=options)


class LabelPolicy:
    """A deterministic policy: replies ``"<label> <turn>"`` (the turn = user messages so far)."""

    def __init__(self, label: str) -> None:
        self.label, self.name = label, label

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        texts = [f"{self.label} {sum(m['role'] == 'user' for m in c)}" for c in conversations]
        return [Completion(text, (1,), (1,), "stop") for text in texts]


def test_policies_run_together_share_one_user_call_per_round(
    sim: DialogueSimulator, user_backend: RecordingBackend
) -> None:
    """run_policies: per round one user call for both policies' dialogues; each gets the dialogues it has alone."""
    prompt_ids = sim.prompt_ids[:3]

    def states() -> list[Any]:
        return [sim.new_state(np.random.default_rng([0, i]), {"prompt_id": p}) for i, p in enumerate(prompt_ids)]

    alone = {}
    for label in ("a", "b"):
        alone[label] = states()
        run_policy(sim, LabelPolicy(label), alone[label], USER_SAMPLING, np.random.default_rng(0))
    user_backend.calls.clear()
    runs = [PolicyRun(LabelPolicy(label), states(), np.random.default_rng(0)) for label in ("a", "b")]
    run_policies(sim, runs, USER_SAMPLING)
    assert [len(call.conversations) for call in user_backend.calls] == [6, 6]  # H = 3: user turns after turns 1, 2
    for run, label in zip(runs, ("a", "b"), strict=True):
        assert [s.messages for s in run.states] == [s.messages for s in alone[label]]
        assert all(s.done and s.messages[-1]["content"] == f"{label} 3" for s in run.states)


# ---- replayed user turns ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def arithmetic_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small arithmetic prompt file (H = 3: two follow-ups per row), written by the generator's CLI."""
    path = tmp_path_factory.mktemp("arithmetic") / "prompts.jsonl"
    arithmetic.main(["--train_dialogues", "20", "--heldout_dialogues", "4", "--output", str(path)])
    return path


def _replayed_env(arithmetic_file: Path, tiny_model_path: str, **settings: Any) -> DialogueEnv:
    """A DialogueEnv on the arithmetic file with the replayed user, H = 3 unless ``settings`` say otherwise."""
    defaults = {"datasets": ["arithmetic"], "user_template": "replay", "reward": "turn_answer", "max_horizon": 3}
    return DialogueEnv(prompts=str(arithmetic_file), policy_model=tiny_model_path, **(defaults | settings))


def test_replayed_user_episode_snapshot_restores_exactly(
    arithmetic_file: Path, tiny_model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gym.make with user_template='replay' loads no user model; every user turn is the row's script; a JSON
    round-tripped snapshot at s_2 restores the same observation, RNG and the same continuation and reward."""
    monkeypatch.setattr("envs.build.build_backend", lambda *a, **k: pytest.fail("the replayed user loads no model"))
    env = gym.make(
        ENV_ID,
        prompts=str(arithmetic_file),
        datasets=["arithmetic"],
        user_template="replay",
        reward="turn_answer",
        policy_model=tiny_model_path,
        max_horizon=3,
        horizon=3,
    ).unwrapped
    assert isinstance(env, DialogueEnv)
    obs, info = env.reset(seed=0)
    row = env.simulator.prompts[info["prompt_id"]]
    assert obs == ({"role": "user", "content": row.instruction},)
    obs, _, _, _, info = env.step(f"It is \\boxed{{{row.turn_references[0]}}}.")
    assert obs[-1] == {"role": "user", "content": row.follow_ups[0]} and info["user_parsed"]
    snapshot = _roundtrip(env.snapshot())
    replies = ["I am not sure.", f"\\boxed{{{row.turn_references[2]}}}"]
    first = [env.step(reply) for reply in replies]
    assert first[0][0][-1] == {"role": "user", "content": row.follow_ups[1]}
    assert first[-1][1:4] == (1.25, True, False)  # the right turn-3 answer, boxed, at the horizon
    restored, restored_info = env.reset(options={"snapshot": snapshot})
    assert restored == obs and json.loads(restored_info["snapshot"]) == snapshot
    again = [env.step(reply) for reply in replies]
    assert [step[:4] for step in again] == [step[:4] for step in first]
    assert env.simulator.user.parse_rate == 1.0


def test_replayed_user_branches_of_one_snapshot_get_the_same_turn_in_any_batch(
    arithmetic_file: Path, tiny_model_path: str
) -> None:
    """Common random numbers: branches restored from one snapshot, batched with other dialogues, get the
    scripted follow-up whatever they replied, and their RNGs advance alike."""
    sim = _replayed_env(arithmetic_file, tiny_model_path).simulator
    rng = np.random.default_rng(0)
    states = [sim.new_state(rng, {"prompt_id": prompt_id}) for prompt_id in sim.prompt_ids[:3]]
    snapshot = states[0].to_snapshot(sim.fingerprint)
    branch, branch_prime = sim.restore(snapshot), sim.restore(snapshot)
    sim.step([branch, states[1], branch_prime, states[2]], ["\\boxed{1}", "\\boxed{2}", "no idea", "\\boxed{3}"])
    script = sim.prompts[branch.prompt_id].follow_ups
    assert branch.messages[-1]["content"] == branch_prime.messages[-1]["content"] == script[0]
    assert branch.rng.bit_generator.state == branch_prime.rng.bit_generator.state


def test_rows_without_a_follow_up_for_every_turn_are_refused_before_anything_is_generated(
    arithmetic_file: Path, tiny_model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_horizon 4 needs three follow-ups; the rows script two: refused with a row id, before any model loads."""
    monkeypatch.setattr("envs.build.build_reward_model", lambda *a, **k: pytest.fail("refused after loading"))
    with pytest.raises(ScriptError, match=r"needs 3 scripted follow-ups .* 24 of 24 rows .*'arithmetic-[0-9a-f]{16}'"):
        _replayed_env(arithmetic_file, tiny_model_path, max_horizon=4, splits=["all"])
