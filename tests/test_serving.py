"""ServingEngine: one engine for successive policies, weights swapped live; a new engine for a new architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dialogsim.backends.serving import ServingEngine, architecture
from dialogsim.backends.transformers_backend import TransformersBackend
from dialogsim.sampling import SamplingParams

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


def test_same_architecture_swaps_weights_into_the_running_engine(tiny_model_path: str, fine_tuned: str) -> None:
    engine = ServingEngine("transformers")
    stats: dict[str, float] = {}
    first = engine.serve(tiny_model_path, stats)
    assert set(stats) == {"engine_start_seconds"}
    assert engine.serve(tiny_model_path) is first  # the loaded policy again: nothing to do

    stats.clear()
    second = engine.serve(fine_tuned, stats)
    assert second is first and set(stats) == {"weight_sync_seconds"} and stats["weight_sync_seconds"] > 0
    assert texts(second) == texts(TransformersBackend(fine_tuned))
    assert texts(second) != texts(TransformersBackend(tiny_model_path))


def test_another_architecture_gets_a_new_engine(tiny_model_path: str, wider: str) -> None:
    assert architecture(wider) != architecture(tiny_model_path)
    engine = ServingEngine("transformers")
    first = engine.serve(tiny_model_path)
    stats: dict[str, float] = {}
    second = engine.serve(wider, stats)
    assert second is not first and set(stats) == {"engine_start_seconds"}
    assert texts(second) == texts(TransformersBackend(wider))


def test_a_server_backend_cannot_serve_policies() -> None:
    with pytest.raises(ValueError, match=r"policy backend 'openai' cannot load a policy's weights; choose one of"):
        ServingEngine("openai")
