"""Build a chat backend by engine name: ``transformers`` | ``vllm`` | ``openai``."""

from __future__ import annotations

from dialogsim.backends.base import ChatBackend

BACKENDS = ("transformers", "vllm", "openai")


def build_backend(
    kind: str,
    model: str,
    *,
    base_url: str | None = None,
    dtype: str = "auto",
    kv_cache_gib: float = 4.0,
    tensor_parallel_size: int = 1,
) -> ChatBackend:
    """A :class:`~dialogsim.backends.base.ChatBackend` for ``model`` on the engine ``kind``.

    Args:
        kind: ``"transformers"`` (in-process, portable), ``"vllm"`` (offline ``LLM`` engine, optional
            extra ``dialogsim[vllm]``) or ``"openai"`` (any OpenAI-compatible chat-completions server).
        model: model name, folder or hub id (for ``openai``: the server's model name).
        base_url: server URL such as ``http://127.0.0.1:8000/v1``; required for ``openai``.
        dtype: the ``engine_dtype`` setting of an in-process engine (``auto``: bf16 only where the hardware has
            it, :func:`dialogsim.precision.engine_dtype`); a server (``openai``) runs in its own.
        kv_cache_gib / tensor_parallel_size: vLLM engine settings.

    Raises:
        ValueError: unknown ``kind``, ``openai`` without ``base_url``, or an unknown ``dtype``.
        ImportError: ``vllm`` requested but not installed (the message says what to install).
    """
    if kind == "transformers":
        from dialogsim.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model, dtype=dtype)
    if kind == "vllm":
        from dialogsim.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, dtype=dtype, kv_cache_gib=kv_cache_gib, tensor_parallel_size=tensor_parallel_size)
    if kind == "openai":
        if not base_url:
            raise ValueError("backend 'openai' needs base_url, e.g. http://127.0.0.1:8000/v1")
        from dialogsim.backends.openai_backend import OpenAIChatBackend

        return OpenAIChatBackend(base_url=base_url, model=model)
    raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
