"""The adapters to other trainers and servers, each against the real pinned package (skipped when its extra is absent).

- OpenEnv (``openenv-core``): a real uvicorn server on 127.0.0.1 and OpenEnv's own WebSocket client;
- ``verifiers``: the environment's rollout, with the real tiny model as the policy;
- TRL: one ``GRPOTrainer`` step on the tiny model with the environment as its rollout source.

The simulator is the tiny random-initialised Llama as the simulated user (4 new tokens, temperature 1,
so that a restored user RNG matters) and the real CPU reward (math verifier + MiniLM).
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from dialogsim.backends.transformers_backend import TransformersBackend, load_tokenizer
from dialogsim.data import load_prompts
from dialogsim.prompts import PromptRow
from dialogsim.rewards.math_reward import MathAnswerReward
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import UserSimulator
from envs import DialogueEnv, VectorDialogueEnv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

USER_SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=4)
REPLIES = ["First, 48 / 2 = 24 clips in May.", "So 48 + 24 = \\boxed{72}."]


@pytest.fixture(scope="module")
def rows(shared_prompts: Path) -> list[PromptRow]:
    return load_prompts(shared_prompts, tasks=["Math_CoT"], datasets=["gsm8k"], limit=4)[0]


@pytest.fixture(scope="module")
def simulator(rows: list[PromptRow], tiny_model_path: str) -> DialogueSimulator:
    """Horizon 2: a reset, one user turn from the tiny model, then the reward."""
    user = UserSimulator(TransformersBackend(tiny_model_path, dtype=torch.float32), "student", USER_SAMPLING)
    config = EpisodeConfig(max_horizon=2, horizon=2)
    return DialogueSimulator(rows, user, MathAnswerReward(), config, load_tokenizer(tiny_model_path))


# ---- OpenEnv ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openenv_url(simulator: DialogueSimulator) -> Iterator[str]:
    """A real uvicorn server of :func:`create_dialogue_app` on a free port of 127.0.0.1."""
    pytest.importorskip("openenv.core", reason="the openenv extra is not installed")
    import uvicorn

    from envs.adapters.openenv_server import create_dialogue_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_dialogue_app(simulator), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the OpenEnv server did not start within 60 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_openenv_session_reset_step_state_and_restore(openenv_url: str, simulator: DialogueSimulator) -> None:
    """OpenEnv's client drives one episode over the WebSocket session; a restored snapshot replays the local env."""
    from envs.adapters.openenv_server import DialogueAction, DialogueEnvClient

    with DialogueEnvClient(base_url=openenv_url).sync() as env:
        result = env.reset(seed=0)
        observation = result.observation
        assert not result.done and result.reward == 0.0 and observation.messages[-1]["role"] == "user"
        snapshot = observation.info["snapshot"]
        state = env.state()
        assert state.snapshot == snapshot and state.turn == 1 and state.horizon == 2
        assert state.config_fingerprint == simulator.fingerprint and state.messages == observation.messages

        middle = env.step(DialogueAction(reply=REPLIES[0]))
        assert not middle.done and middle.observation.messages[-2] == {"role": "assistant", "content": REPLIES[0]}
        assert middle.observation.info["turn"] == 2 and middle.observation.info["replied_turn"] == 1
        end = env.step(DialogueAction(reply=REPLIES[1]))
        assert end.done and end.observation.terminated and not end.observation.truncated
        assert math.isfinite(end.reward) and "snapshot" not in end.observation.info
        assert env.state().snapshot is None and env.state().done

        # restore s_1 in the session: the same user turn as before (the user RNG travels in the snapshot)
        restored = env.reset(snapshot=snapshot)
        assert restored.observation.messages == observation.messages
        assert env.step(DialogueAction(reply=REPLIES[0])).observation == middle.observation

    # the same snapshot in a local env on the same simulator gives the same dialogue and reward
    local = DialogueEnv(simulator=simulator)
    local.reset(options={"snapshot": json.loads(json.dumps(snapshot))})
    local_messages, *_ = local.step(REPLIES[0])
    assert list(local_messages) == middle.observation.messages
    _, local_reward, terminated, _, _ = local.step(REPLIES[1])
    assert terminated and local_reward == pytest.approx(end.reward)


def test_openenv_http_step_from_snapshot_needs_no_session(openenv_url: str) -> None:
    """Plain HTTP: POST /reset, then POST /step with the snapshot in the action (the HTTP routes keep no session)."""
    import httpx

    with httpx.Client(base_url=openenv_url, timeout=60) as http:
        assert http.get("/health").json()["status"] == "healthy"
        start = http.post("/reset", json={"seed": 1}).json()
        snapshot = start["observation"]["info"]["snapshot"]
        steps = [
            http.post("/step", json={"action": {"reply": REPLIES[0], "snapshot": snapshot}}).json() for _ in range(2)
        ]
        assert steps[0] == steps[1] and steps[0]["done"] is False
        assert steps[0]["observation"]["messages"][:-2] == start["observation"]["messages"]
        wrong = http.post("/step", json={"action": {"reply": REPLIES[0], "snapshot": {"version": 1}}})
        assert wrong.status_code == 500


def test_vector_env_drives_remote_workers(openenv_url: str, simulator: DialogueSimulator) -> None:
    """VectorDialogueEnv over RemoteSimulator (two sessions) replays the local vector env from the same snapshots."""
    from envs.adapters.openenv_server import RemoteSimulator

    local = VectorDialogueEnv(3, simulator=simulator, autoreset_mode=AutoresetMode.DISABLED)
    _, infos = local.reset(seed=5)
    snapshots = infos["snapshot"]
    remote_simulator = RemoteSimulator([openenv_url, openenv_url])
    try:
        assert remote_simulator.fingerprint == simulator.fingerprint
        remote = VectorDialogueEnv(3, simulator=remote_simulator, autoreset_mode=AutoresetMode.DISABLED)
        remote_obs, remote_infos = remote.reset(options={"snapshots": snapshots})
        local_obs, _ = local.reset(options={"snapshots": snapshots})
        assert remote_obs == local_obs and remote_infos["snapshot"] == snapshots
        for reply in REPLIES:
            actions = [f"{reply} ({i})" for i in range(3)]
            remote_step, local_step = remote.step(actions), local.step(actions)
            assert remote_step[0] == local_step[0]  # observations
            # rewards: the worker embeds one dialogue per call, the local env three (MiniLM padding: float32 noise)
            np.testing.assert_allclose(remote_step[1], local_step[1], rtol=1e-5)
            assert (
                remote_step[2].tolist() == local_step[2].tolist()
                and remote_step[4]["snapshot"] == local_step[4]["snapshot"]
            )
        assert remote_step[2].all() and np.isfinite(remote_step[1]).all()
        # a fresh start on a worker (prompt id and horizon chosen by the caller)
        fresh_obs, fresh_infos = remote.reset(seed=0, options={"prompt_ids": [simulator.prompt_ids[1]] * 3})
        assert fresh_infos["turn"].tolist() == [1, 1, 1] and len({o[0]["content"] for o in fresh_obs}) == 1
    finally:
        remote_simulator.close()
