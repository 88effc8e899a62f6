"""The adapters to other trainers and servers, each against the real pinned package (skipped when its extra is absent).

- OpenEnv (``openenv-core``): a real uvicorn server on 127.0.0.1 and OpenEnv's own WebSocket client;
- ``verifiers``: the environment loaded by its taskset id, and one episode of its user loop with the tiny model
  as the policy (a verifiers rollout itself runs the policy in a harness program, see the verifiers test);
- TRL: one ``GRPOTrainer`` step on the tiny model with the environment as its rollout source.

The simulator is the tiny random-initialised Llama as the simulated user (4 new tokens, temperature 1,
so that a restored user RNG matters) and the real CPU reward (math verifier + MiniLM).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    user = UserSimulator(TransformersBackend(tiny_model_path, dtype="float32"), "student", USER_SAMPLING)
    config = EpisodeConfig(max_horizon=2, horizon=2)
    return DialogueSimulator(rows, user, MathAnswerReward(), config, load_tokenizer(tiny_model_path))


# ---- OpenEnv ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openenv_adapter() -> Any:
    pytest.importorskip("openenv.core", reason="the openenv extra is not installed")
    from envs.adapters import openenv_server

    return openenv_server


@pytest.fixture(scope="module")
def openenv_url(openenv_adapter: Any, simulator: DialogueSimulator) -> Iterator[str]:
    """A real uvicorn server of :func:`create_dialogue_app` on a free port of 127.0.0.1 (skipped without the extra)."""
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


@pytest.mark.slow
def test_openenv_session_reset_step_state_and_restore(openenv_url: str, simulator: DialogueSimulator) -> None:
    """OpenEnv's client drives one episode over the WebSocket session; a restored snapshot replays the local env."""
    from envs.adapters.openenv_server import DialogueAction, DialogueEnvClient

    with DialogueEnvClient(base_url=openenv_url).sync() as env:
        result = env.reset(seed=0)
        observation = result.observation
        assert not result.done and result.reward == 0.0 and observation.messages[-1]["role"] == "user"
        snapshot = observation.info["snapshot"]
        state = env.state()
        assert state.snapshot == json.loads(snapshot) and state.turn == 1 and state.horizon == 2
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_openenv_worker_serves_replayed_user_turns(
    openenv_adapter: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m envs.adapters.openenv_server --user_template replay --datasets arithmetic``: a worker whose
    user turns are the rows' scripts, built by build_simulator (no user model), handed to uvicorn."""
    from dialogsim import arithmetic
    from dialogsim.user import ReplayedUser

    prompts = tmp_path / "arithmetic.jsonl"
    arithmetic.main(["--train_dialogues", "6", "--heldout_dialogues", "0", "--output", str(prompts)])
    built: list[DialogueSimulator] = []
    build = openenv_adapter.build_simulator

    def recording_build(**settings: Any) -> DialogueSimulator:
        built.append(build(**settings))
        return built[-1]

    monkeypatch.setattr(openenv_adapter, "build_simulator", recording_build)
    served: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.append(app))
    argv = [
        "--prompts",
        str(prompts),
        "--user_template",
        "replay",
        "--datasets",
        "arithmetic",
        "--reward",
        "turn_answer",
    ]
    openenv_adapter.main(argv)
    (simulator,) = built
    assert isinstance(simulator.user, ReplayedUser) and len(simulator.prompts) == 6 and len(served) == 1


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
        assert remote_obs == local_obs and remote_infos["snapshot"].tolist() == snapshots.tolist()
        for reply in REPLIES:
            actions = [f"{reply} ({i})" for i in range(3)]
            remote_step, local_step = remote.step(actions), local.step(actions)
            assert remote_step[0] == local_step[0]  # observations
            # rewards: the worker embeds one dialogue per call, the local env three (MiniLM padding: float32 noise)
            np.testing.assert_allclose(remote_step[1], local_step[1], rtol=1e-5)
            assert (
                remote_step[2].tolist() == local_step[2].tolist()
                and remote_step[4]["snapshot"].tolist() == local_step[4]["snapshot"].tolist()
            )
        assert remote_step[2].all() and np.isfinite(remote_step[1]).all()
        # a fresh start on a worker (prompt id and horizon chosen by the caller)
        fresh_obs, fresh_infos = remote.reset(seed=0, options={"prompt_ids": [simulator.prompt_ids[1]] * 3})
        assert fresh_infos["turn"].tolist() == [1, 1, 1] and len({o[0]["content"] for o in fresh_obs}) == 1
    finally:
        remote_simulator.close()


# ---- verifiers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vf_adapter() -> Any:
    pytest.importorskip("verifiers.v1", reason="the verifiers extra is not installed")
    from envs.adapters import verifiers_env

    return verifiers_env


def test_verifiers_env_loads_by_taskset_id_with_our_prompts(
    vf_adapter: Any, shared_prompts: Path, tiny_model_path: str
) -> None:
    """verifiers resolves the taskset id to DialogsimEnv; its tasks are dialogsim's loader's rows, in order."""
    import verifiers.v1 as vf
    from verifiers.v1.utils.loaders import environment_class, resolve_env_config

    assert environment_class(vf_adapter.TASKSET_ID) is vf_adapter.DialogsimEnv
    # what vf-eval's --env.* flags, a TOML [env] block and prime-rl go through: raw data narrowed to our configs
    raw = {"taskset": {"id": vf_adapter.TASKSET_ID, "datasets": ["gsm8k"]}, "max_horizon": 2}
    resolved = resolve_env_config(raw)
    assert isinstance(resolved, vf_adapter.DialogsimEnvConfig) and resolved.max_horizon == 2
    assert isinstance(resolved.taskset, vf_adapter.DialogsimTasksetConfig) and resolved.taskset.datasets == ["gsm8k"]
    taskset = vf_adapter.DialogsimTasksetConfig(
        prompts=str(shared_prompts), datasets=["gsm8k"], limit=4, policy_model=tiny_model_path
    )
    env = vf.load_environment(vf_adapter.DialogsimEnvConfig(taskset=taskset))
    assert isinstance(env, vf_adapter.DialogsimEnv)
    expected = load_prompts(shared_prompts, tasks=["Math_CoT"], datasets=["gsm8k"])[0][:4]
    tasks = list(env.taskset)
    assert [(task.data.idx, task.key, task.data.prompt) for task in tasks] == [
        (i, row.id, row.instruction) for i, row in enumerate(expected)
    ]


def _tiny_policy(tiny_model_path: str, conversation: list[dict[str, str]]) -> Any:
    """The tiny model as the policy of an interaction: the reply function ``converse`` drives."""
    policy = TransformersBackend(tiny_model_path, dtype="float32")
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8)

    async def reply(user_message: str | None) -> str | None:
        if user_message is not None:
            conversation.append({"role": "user", "content": user_message})
        (completion,) = policy.chat([conversation], sampling)
        conversation.append({"role": "assistant", "content": completion.text})
        return completion.text

    return reply


def test_verifiers_episode_with_the_tiny_policy(
    vf_adapter: Any, simulator: DialogueSimulator, tiny_model_path: str
) -> None:
    """One episode: the simulated user answers the tiny policy to the horizon; the reward lands on a real trace."""
    import verifiers.v1 as vf

    env = DialogueEnv(simulator=simulator)
    first, _ = env.reset(seed=0, options={"prompt_id": simulator.prompt_ids[0]})
    conversation = [dict(message) for message in first]  # the interaction opens with the task's prompt
    outcome = asyncio.run(vf_adapter.converse(env, _tiny_policy(tiny_model_path, conversation), asyncio.Lock()))
    assert outcome.terminated and outcome.complete and outcome.messages == conversation
    assert [m["role"] for m in outcome.messages] == ["user", "assistant", "user", "assistant"]
    # the same replies in a plain DialogueEnv from the same reset give the same reward
    replay = DialogueEnv(simulator=simulator)
    replay.reset(seed=0, options={"prompt_id": simulator.prompt_ids[0]})
    for reply in outcome.messages[1::2]:
        _, reward, *_ = replay.step(reply["content"])
    assert math.isfinite(outcome.reward) and reward == pytest.approx(outcome.reward)

    trace = vf.Trace(task=vf.TraceTask(type="DialogueTask", data={}), agent=vf.AgentInfo(config=vf.AgentConfig()))
    vf_adapter.record(trace, outcome)
    assert trace.rewards[vf_adapter.REWARD_NAME].score == pytest.approx(outcome.reward)
    assert trace.metrics == {"dialogue_complete": 1.0, "turns": 2.0, "truncated": 0.0}


def test_verifiers_policy_that_stops_early_gets_no_reward(vf_adapter: Any, simulator: DialogueSimulator) -> None:
    """A policy run that ends before the horizon (a verifiers turn limit) records no reward, only the metrics."""
    import verifiers.v1 as vf

    env = DialogueEnv(simulator=simulator)
    env.reset(seed=1)
    replies = iter([REPLIES[0], None])

    async def reply(_: str | None) -> str | None:
        return next(replies)

    outcome = asyncio.run(vf_adapter.converse(env, reply, asyncio.Lock()))
    assert not outcome.complete and math.isnan(outcome.reward) and len(outcome.messages) == 3
    trace = vf.Trace(task=vf.TraceTask(type="DialogueTask", data={}), agent=vf.AgentInfo(config=vf.AgentConfig()))
    vf_adapter.record(trace, outcome)
    assert trace.rewards == {} and trace.metrics["dialogue_complete"] == 0.0


# ---- TRL ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_adapter() -> Any:
    pytest.importorskip("trl", reason="the trl extra is not installed")
    from envs.adapters import trl_rollout

    return trl_rollout


@pytest.mark.slow
def test_trl_grpo_step_with_the_environment_as_rollout_source(
    trl_adapter: Any, simulator: DialogueSimulator, tiny_model_path: str, tmp_path: Path
) -> None:
    """One GRPOTrainer step on the tiny model whose rollouts are dialogues with the simulated user."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    rollout = trl_adapter.DialogueRollout(simulator, max_new_tokens=6)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_steps=1,
        learning_rate=1e-2,
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_adapter.dialogsim_reward,
        args=args,
        train_dataset=trl_adapter.prompt_dataset(simulator),
        processing_class=tokenizer,
        rollout_func=rollout,
    )
    trainer.train()
    assert trainer.state.global_step == 1
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["reward"]) and logged["reward_std"] > 0
    assert any(not torch.equal(before[name], parameter) for name, parameter in model.named_parameters())

    # the mapping: replies are trained (mask 1), the simulated user's turns are not (mask 0)
    row = next(iter(simulator.prompts.values()))
    output = rollout([[{"role": "user", "content": row.instruction}]], trainer)
    assert {key: len(value) for key, value in output.items()} == dict.fromkeys(output, 1)
    dialogue, ids, mask = output["dialogue"][0], output["completion_ids"][0], output["env_mask"][0]
    assert [m["role"] for m in dialogue] == ["user", "assistant", "user", "assistant"]
    assert dialogue[0]["content"] == row.instruction and len(output["logprobs"][0]) == len(ids) == len(mask)
    segments = [
        (k, [i for i, _ in group]) for k, group in itertools.groupby(zip(ids, mask, strict=True), lambda t: t[1])
    ]
    assert [k for k, _ in segments] == [1, 0, 1]
    assert tokenizer.decode(segments[0][1], skip_special_tokens=True) == dialogue[1]["content"]
    assert dialogue[2]["content"] in tokenizer.decode(segments[1][1])
    assert tokenizer.decode(segments[2][1], skip_special_tokens=True) == dialogue[3]["content"]
    assert output["prompt_ids"][0] == tokenizer.apply_chat_template(
        dialogue[:1], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert math.isfinite(output["dialogsim_reward"][0])
