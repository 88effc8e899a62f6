"""ServingEngine: one engine for successive policies, weights swapped live; a new engine for a new architecture;
roles taking turns on one engine; the simulated user's engine under ``user_backend="auto"``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from doubles import tiny_llama_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dialogsim.backends.serving import EngineRole, ServingEngine, architecture, resolve_user_backend, user_engine
from dialogsim.backends.transformers_backend import TransformersBackend
from dialogsim.sampling import SamplingParams
from refuel.config import RefuelConfig
from refuel.evaluation.evaluate import EvaluateConfig

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
CHATS = [[{"role": "user", "content": "What is 7 times 8?"}], [{"role": "user", "content": "Name a prime."}]]


def save(model: torch.nn.Module, tokenizer_path: str, folder: Path) -> str:
    """Save ``model`` with the tokenizer of ``tokenizer_path`` into ``folder``; return the folder."""
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def fine_tuned(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with every weight perturbed: same architecture, other outputs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return save(model, tiny_model_path, tmp_path_factory.mktemp("fine-tuned"))


@pytest.fixture(scope="module")
def wider(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model of another width (its weights cannot be loaded into the tiny model)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    torch.manual_seed(2)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size=48, tie_word_embeddings=True))
    return save(model, tiny_model_path, tmp_path_factory.mktemp("wider"))


def texts(backend: TransformersBackend) -> list[str]:
    """Greedy replies to :data:`CHATS`."""
    return [c.text for c in backend.chat(CHATS, GREEDY)]


@pytest.mark.slow
def test_same_architecture_swaps_weights_into_the_running_engine(tiny_model_path: str, fine_tuned: str) -> None:
    engine = ServingEngine("transformers")
    stats = engine.load(tiny_model_path)
    first = engine.serve(tiny_model_path)
    assert set(stats) == {"engine_start_seconds"}
    assert engine.serve(tiny_model_path) is first  # the loaded policy again: nothing to do

    stats = engine.load(fine_tuned)
    second = engine.serve(fine_tuned)
    assert second is first and set(stats) == {"weight_sync_seconds"} and stats["weight_sync_seconds"] > 0
    assert texts(second) == texts(TransformersBackend(fine_tuned))
    assert texts(second) != texts(TransformersBackend(tiny_model_path))


@pytest.mark.slow
def test_another_architecture_gets_a_new_engine(tiny_model_path: str, wider: str) -> None:
    assert architecture(wider) != architecture(tiny_model_path)
    engine = ServingEngine("transformers")
    first = engine.serve(tiny_model_path)
    stats = engine.load(wider)
    second = engine.serve(wider)
    assert second is not first and set(stats) == {"engine_start_seconds"}
    assert texts(second) == texts(TransformersBackend(wider))


def test_a_server_backend_cannot_serve_policies() -> None:
    with pytest.raises(ValueError, match=r"policy backend 'openai' cannot load a policy's weights; choose one of"):
        ServingEngine("openai")


@pytest.mark.slow
def test_roles_take_turns_on_one_engine(tiny_model_path: str, fine_tuned: str) -> None:
    """Two roles on one engine: each call generates with its own role's weights, swapping only when needed."""
    engine = ServingEngine("transformers")
    base, tuned = engine.role(tiny_model_path), engine.role(fine_tuned)
    expected = {role: texts(TransformersBackend(path)) for role, path in ((base, tiny_model_path), (tuned, fine_tuned))}
    assert engine.backend is None  # nothing is loaded before the first call
    for role in (base, base, tuned, base, tuned):
        assert texts(role) == expected[role]
    assert engine.weight_syncs == 3  # base (start), tuned, base, tuned: three swaps


def test_auto_user_backend_is_the_policy_backend() -> None:
    assert resolve_user_backend("auto", "vllm") == "vllm"
    assert resolve_user_backend("auto", "transformers") == "transformers"
    assert resolve_user_backend("openai", "vllm") == "openai"  # explicit values stay
    with pytest.raises(ValueError, match=r"unknown user_backend 'llama'; choose auto or one of transformers"):
        resolve_user_backend("llama", "vllm")
    assert RefuelConfig().user_backend == EvaluateConfig().user_backend == "auto"
    with pytest.raises(ValueError, match=r"user_backend='llama'"):
        RefuelConfig(user_backend="llama")


def test_auto_user_shares_a_vllm_policy_engine_of_its_architecture(
    tiny_model_path: str, fine_tuned: str, wider: str
) -> None:
    """Only 'auto' with a vLLM policy engine shares, and only when every policy has the user's architecture."""
    engine = ServingEngine("vllm")  # not started: sharing is decided from the model configs
    shared = user_engine("auto", engine, [tiny_model_path, fine_tuned], tiny_model_path)
    assert isinstance(shared, EngineRole) and shared.serving is engine and engine.backend is None
    assert user_engine("vllm", engine, [tiny_model_path], tiny_model_path) is None  # explicit: its own engine
    assert user_engine("auto", engine, [tiny_model_path, wider], tiny_model_path) is None  # another architecture
    assert user_engine("auto", ServingEngine("transformers"), [tiny_model_path], tiny_model_path) is None
