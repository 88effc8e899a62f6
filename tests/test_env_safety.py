"""State safety of the environments: a bad action or an error inside ``step`` changes nothing; bad options raise."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import numpy as np
import pytest

from dialogsim.backends.openai_backend import OpenAIChatBackend, ServerError
from dialogsim.backends.transformers_backend import TransformersBackend, load_tokenizer
from dialogsim.data import load_prompts
from dialogsim.dialogue import SnapshotError
from dialogsim.prompts import PromptRow
from dialogsim.rewards.null import NoReward
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import UserSimulator
from envs import DialogueEnv, VectorDialogueEnv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONE_SURROGATE = "bad \ud800 reply"


@pytest.fixture(scope="module")
def rows(shared_prompts: Path) -> list[PromptRow]:
    return load_prompts(shared_prompts, tasks=["Math_CoT"], datasets=["gsm8k"], limit=4)[0]


@pytest.fixture(scope="module")
def sim(rows: list[PromptRow], tiny_model_path: str) -> DialogueSimulator:
    """The tiny random-initialised user model, horizon 3, no reward (none is reached before the horizon)."""
    user = UserSimulator(
        TransformersBackend(tiny_model_path, dtype="float32"),
        "student",
        SamplingParams(temperature=1.0, max_new_tokens=4),
    )
    return DialogueSimulator(
        rows, user, NoReward(), EpisodeConfig(max_horizon=3, horizon=3), load_tokenizer(tiny_model_path)
    )


@pytest.fixture(scope="module")
def unreachable_user_sim(rows: list[PromptRow], tiny_model_path: str) -> DialogueSimulator:
    """A simulator whose user model is served at a closed local port: every user call raises ServerError."""
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "user-model", timeout=5.0, max_retries=0)
    return DialogueSimulator(
        rows, UserSimulator(backend, "student"), NoReward(), EpisodeConfig(max_horizon=3, horizon=3),
        load_tokenizer(tiny_model_path),
    )  # fmt: skip


def _snapshots(venv: VectorDialogueEnv) -> list[dict]:
    return [state.to_snapshot(venv.simulator.fingerprint) for state in venv.states if state is not None]


def test_lone_surrogate_action_is_refused_and_the_dialogue_goes_on(sim: DialogueSimulator) -> None:
    """step("bad \\ud800") raises ValueError naming the action, leaves the state as it was, and the episode goes on."""
    env = DialogueEnv(simulator=sim)
    obs, _ = env.reset(seed=0)
    before = env.snapshot()
    with pytest.raises(ValueError, match=r"action holds the surrogate code point '\\ud800' at character 4"):
        env.step(LONE_SURROGATE)
    assert env.snapshot() == before
    obs, _, terminated, _, info = env.step("A fine reply.")
    assert not terminated and info["turn"] == 2 and obs[-2] == {"role": "assistant", "content": "A fine reply."}


def test_vector_env_bad_slot_changes_no_slot(sim: DialogueSimulator) -> None:
    """One lone surrogate among N actions raises ValueError naming its index; no slot changes; the next step works."""
    venv = VectorDialogueEnv(3, simulator=sim)
    _, infos = venv.reset(seed=0)
    before = [json.loads(text) for text in infos["snapshot"]]
    with pytest.raises(ValueError, match=r"actions\[1\] holds the surrogate"):
        venv.step(["one", LONE_SURROGATE, "three"])
    assert _snapshots(venv) == before
    _, _, terminated, _, infos = venv.step(["one", "two", "three"])
    assert infos["turn"].tolist() == [2, 2, 2] and not terminated.any()


def test_error_inside_step_leaves_the_states_unchanged(sim: DialogueSimulator) -> None:
    """A reply the tokenizer cannot encode, passed to the simulator directly, raises inside step; no state changes."""
    states = [sim.new_state(np.random.default_rng(seed)) for seed in (0, 1)]
    before = [state.to_snapshot(sim.fingerprint) for state in states]
    with pytest.raises(Exception):  # noqa: B017 - whatever the tokenizer raises, the states must not change
        sim.step(states, ["fine", LONE_SURROGATE])
    assert [state.to_snapshot(sim.fingerprint) for state in states] == before


def test_user_backend_failure_leaves_env_and_rng_unchanged(unreachable_user_sim: DialogueSimulator) -> None:
    """A user-model server that refuses the connection fails the step after the reply and the user seeds were
    taken; messages, RNG state and flags are all put back, in the single and the vector env."""
    env = DialogueEnv(simulator=unreachable_user_sim)
    env.reset(seed=0)
    before = env.snapshot()
    with pytest.raises(ServerError):
        env.step("A reply.")
    assert env.snapshot() == before and not env.state.done  # type: ignore[union-attr]

    venv = VectorDialogueEnv(2, simulator=unreachable_user_sim)
    _, infos = venv.reset(seed=0)
    with pytest.raises(ServerError):
        venv.step(["a", "b"])
    assert _snapshots(venv) == [json.loads(text) for text in infos["snapshot"]]


def test_snapshot_with_a_replaced_prompt_is_refused(sim: DialogueSimulator) -> None:
    """A snapshot whose first user message was replaced (here by another row's instruction) raises SnapshotError;
    the same text with other case and spacing still restores."""
    env = DialogueEnv(simulator=sim)
    env.reset(options={"prompt_id": sim.prompt_ids[0]})
    snapshot = env.snapshot()
    edited = copy.deepcopy(snapshot)
    edited["messages"][0]["content"] = sim.prompts[sim.prompt_ids[1]].instruction
    with pytest.raises(SnapshotError, match="not the instruction of snapshot\\['prompt_id'\\]"):
        env.reset(options={"snapshot": edited})
    respaced = copy.deepcopy(snapshot)
    respaced["messages"][0]["content"] = "  " + snapshot["messages"][0]["content"].upper().replace(" ", "\n")
    obs, _ = env.reset(options={"snapshot": respaced})
    assert obs[0]["content"] == respaced["messages"][0]["content"]


def test_unknown_reset_option_raises(sim: DialogueSimulator) -> None:
    """A typo'd options key raises ValueError naming the intended key, in the single and the vector env."""
    env = DialogueEnv(simulator=sim)
    env.reset(seed=0)
    snapshot = env.snapshot()
    with pytest.raises(ValueError, match="unknown option\\(s\\) 'snapshots' \\(did you mean 'snapshot'\\?\\)"):
        env.reset(options={"snapshots": snapshot})
    venv = VectorDialogueEnv(2, simulator=sim)
    with pytest.raises(ValueError, match="'prompt_id' \\(did you mean 'prompt_ids'\\?\\)"):
        venv.reset(options={"prompt_id": [sim.prompt_ids[0]] * 2})
