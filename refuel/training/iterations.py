"""``refuel-train``: N REFUEL iterations, each collect → tokenise → π_t log-probs → regression → π_{t+1}.

Run directory layout (every file written atomically; a re-run resumes after the last finished stage,
and is refused if its settings differ from those a started stage recorded: :mod:`refuel.run_folder`)::

    <output_dir>/run.json                       marks the folder as a run; each stage's settings (refuel.run_folder)
    <output_dir>/config.json                    the settings of the latest (accepted) invocation
    <output_dir>/provenance.json                package versions, model weight and data file SHA-256
    <output_dir>/iteration_<t>/shards/          collection in progress: one shard per batch + manifest.json
    <output_dir>/iteration_<t>/checkpoints/     training in progress: the latest resumable training state
    <output_dir>/iteration_<t>/pairs.jsonl      tokenised pairs (refuel.pairs.TokenizedPair); after training with
                                                π_t's log-probs (refuel.pairs.ScoredPair)
    <output_dir>/iteration_<t>/collection.json  drops by reason, user parse rate, tokenisation checks
    <output_dir>/iteration_<t>/metrics.json     drops by reason, validation before/after, step log; written
                                                last, it marks the iteration as done
    <output_dir>/iteration_<t>/policy/          π_{t+1} (save_pretrained folder)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, set_seed

from dialogsim.backends.base import ChatBackend, WeightSyncBackend
from dialogsim.backends.serving import ServingEngine, user_engine
from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.console import console_command, failure_state
from dialogsim.data import check_prompt_source
from dialogsim.dialogue import fingerprint
from dialogsim.models import resolve_model
from dialogsim.precision import backend_precision, training_dtype
from dialogsim.rewards.factory import check_reward_scores
from dialogsim.simulator import DialogueSimulator
from envs.build import build_simulator, check_model_names
from refuel.cli import parse_config
from refuel.collection.collect import iter_pair_batches
from refuel.collection.resets import ResetDistribution
from refuel.collection.shards import PairShards
from refuel.config import RefuelConfig
from refuel.pairs import (
    SCORED_PAIR_FEATURES,
    TOKENIZED_PAIR_FEATURES,
    ScoredPair,
    TokenizedPair,
    read_tokenized_pairs,
    tokenize_pairs,
)
from refuel.provenance import run_provenance
from refuel.run_folder import RunFolder, describe_run, stage_settings
from refuel.storage import write_json, write_rows
from refuel.training.batching import validation_count
from refuel.training.distributed import build_accelerator
from refuel.training.trainer import RefuelTrainer

logger = logging.getLogger(__name__)


def build_training_simulator(config: RefuelConfig, engine: PolicyEngine) -> DialogueSimulator:
    """The simulator on the training split of the prompts; its user on π_t's engine if ``user_backend`` allows.

    See :func:`~dialogsim.backends.serving.user_engine` for when the user shares the policy's engine.
    """
    return build_simulator(
        config,
        partition="train" if config.holdout else "all",
        policy_model=config.policy_model,
        max_horizon=config.max_horizon,
        user_engine=user_engine(config.user_backend, engine.current, [config.policy_model], config.user_model),
    )


class PolicyEngine:
    """The run's policy engines: π_t's, started at the first collection and then weight-synced, and π_ref's.

    With ``backend="vllm"`` the engine (and its prefix cache) stays up across iterations; after each
    iteration π_{t+1}'s saved weights are loaded into it live instead of restarting it.
    """

    def __init__(self, config: RefuelConfig) -> None:
        self.config = config
        self.current, self.initial = (
            ServingEngine(
                config.backend,
                dtype=config.engine_dtype,
                kv_cache_gib=config.vllm_kv_cache_gib,
                tensor_parallel_size=config.vllm_tensor_parallel_size,
            )
            for _ in range(2)
        )

    def initial_policy(self, reset: ResetDistribution) -> WeightSyncBackend | None:
        """π_ref's engine (the initial policy, never updated) when it rolls in (``reset.rollin == "initial"``:
        the last-turn baselines and ``--rollin initial``); ``None`` when π_t rolls in."""
        if not reset.needs_initial_policy:
            return None
        return self.initial.serve(resolve_model(self.config.policy_model))

    def serving(self, policy_path: str) -> tuple[ChatBackend, dict[str, float]]:
        """π_t = the weights in ``policy_path`` on its engine, and the engine's start or weight-sync time
        (``engine_start_seconds`` / ``weight_sync_seconds``, seconds; empty when it already served them).

        The engine is started or synced now; the returned role swaps π_t's weights back in before a call
        if the simulated user, sharing the engine, swapped its own in.
        """
        timing = self.current.load(policy_path)
        return self.current.role(policy_path), timing


def prepare_pairs(
    config: RefuelConfig, simulator: DialogueSimulator, engine: PolicyEngine, iteration: int, policy_path: str
) -> None:
    """Collect and tokenise pairs with π_t (the weights in ``policy_path``) into ``pairs.jsonl`` and their
    statistics into ``collection.json``, unless a previous run did.

    Collection streams batch by batch into crash-safe shards (:class:`~refuel.collection.shards.PairShards`):
    a restarted run collects only the batches that are not on disk yet.
    """
    path = Path(config.output_dir) / f"iteration_{iteration}" / "pairs.jsonl"
    if path.exists():
        logger.info("resuming: reusing %s", path)
        return
    stats: dict[str, Any] = {"iteration": iteration, "policy_in": policy_path}
    settings = stage_settings(config, "collection") | {"policy": policy_path}
    shards = PairShards(path.with_name("shards"), fingerprint(settings))
    if shards.done():
        logger.info("resuming: %d collected batches on disk in %s", len(shards.done()), shards.folder)
    started = time.perf_counter()
    reset, offline_report = ResetDistribution.from_config(config, simulator)
    if offline_report is not None:
        stats["offline_dialogues"] = str(offline_report)
    policy, timing = engine.serving(policy_path)
    stats |= timing
    batches = iter_pair_batches(
        simulator,
        policy,
        config.pairs_per_iteration,
        config.sampling_params(),
        seed=config.seed + 1000 * iteration,
        batch_size=config.generation_batch_size,
        reset=reset,
        initial_policy=engine.initial_policy(reset),
        skip=shards.done(),
    )
    for index, batch in batches:  # a batch's seconds include the set-up before it (engine start, planning)
        shards.write(index, batch, seconds=time.perf_counter() - started)
        started = time.perf_counter()
    result = shards.read()
    stats["collection_seconds"] = shards.seconds()  # of every run that collected, not only the last one
    stats["dropped"] = dict(result.dropped)
    stats["reset_sources"] = dict(result.sources)
    stats["user_parse_rate"] = simulator.user.parse_rate
    pairs, tokenization = tokenize_pairs(result.pairs, simulator.tokenizer)
    stats["tokenization"] = dict(tokenization)
    write_json(stats, path.with_name("collection.json"))
    write_rows(pairs, path, TOKENIZED_PAIR_FEATURES)


def split_validation(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``count`` pairs' indices into training and validation indices."""
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_val = validation_count(count, fraction)
    return order[n_val:], order[:n_val]


def train_iteration(
    config: RefuelConfig,
    pairs: list[TokenizedPair],
    policy_path: str,
    tokenizer: PreTrainedTokenizerBase,
    checkpoints: Path | None = None,
) -> tuple[RefuelTrainer, dict[str, Any], list[ScoredPair]]:
    """π_t's log-probs, then gradient steps π_t → π_{t+1}, with validation before and after.

    π_t is loaded in :func:`~dialogsim.precision.training_dtype` (float32 master weights; ``mixed_precision``
    sets the compute precision), also with LoRA: merged adapter updates would be rounded away in 16-bit weights.

    Returns:
        The trainer, the iteration's metrics, and ``pairs`` in their order with π_t's log-probs.
    """
    train_index, val_index = split_validation(len(pairs), config.validation_fraction, config.seed)
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=training_dtype())
    trainer = RefuelTrainer(config, model, tokenizer, [pairs[i] for i in train_index], [pairs[i] for i in val_index])
    scored = trainer.compute_logp_t()  # once, on the training micro-batches, before any gradient step
    before = {split: asdict(trainer.metrics_at_pi_t(split)) for split in ("train", "validation")}  # no forward pass
    log = trainer.train(checkpoints, config.checkpoint_every, config.checkpoint_minutes)
    after = {split: asdict(trainer.validate(split)) for split in ("train", "validation")}
    metrics = {
        "train_pairs": len(train_index),
        "validation_pairs": len(val_index),
        "validation_before": before["validation"],
        "validation_after": after["validation"],
        "train_fit_before": before["train"],
        "train_fit_after": after["train"],
        "processes": trainer.accelerator.num_processes,
        "effective_batch_size": trainer.effective_batch_size,
        "steps": log,
    }
    by_index = dict(zip(train_index + val_index, scored.train + scored.validation, strict=True))
    return trainer, metrics, [by_index[index] for index in range(len(pairs))]  # in collection order


def run(config: RefuelConfig) -> str:
    """Run all iterations; returns the folder of the last policy π_T.

    Before anything is written or loaded, the reward is checked against the selected tasks and the run folder
    is checked (:class:`~refuel.run_folder.RunFolder`): a folder of another program, or stages recorded with
    settings that differ from ``config``'s, are refused. Under ``accelerate launch`` the main process alone
    collects and writes the run files; the other processes wait for ``pairs.jsonl`` and join the training
    (each takes its share of every batch).

    Raises:
        UsageError: ``config.reward`` cannot be found or cannot score the selected tasks, or is ``"none"``
            (:func:`~dialogsim.rewards.factory.check_reward_scores`); a model name is neither a known name,
            a folder nor a hub id (offline: nor in the local cache; :func:`~dialogsim.models.check_model_name`).
        RunFolderError: ``output_dir`` is not this run's folder (see :meth:`~refuel.run_folder.RunFolder.check`).
        LaunchMismatchError: before any collection, when ``accelerate`` runs another engine or process
            count than the launch asked for (:func:`refuel.training.distributed.build_accelerator`).
    """
    check_reward_scores(config.reward, config.tasks)  # before anything is written or generated
    check_prompt_source(config.prompts)
    run_dir = Path(config.output_dir)
    folder = RunFolder(run_dir)
    restart = folder.check(config)
    check_model_names(config, config.policy_model)
    precision = backend_precision(config.engine_dtype, config.backend)  # logged once
    set_seed(config.seed)
    state = build_accelerator(config)  # before any collection: refuses a launch that fell back
    if state.is_main_process:
        if restart is not None:
            logger.warning("--restart_stage %s: starting %s's %s over", config.restart_stage, *restart)
            folder.restart(*restart)
        folder.save()
        write_json(asdict(config), run_dir / "config.json")
        models = {"policy": config.policy_model, "user": config.user_model, "reward": config.reward}
        write_json(run_provenance(models, [config.prompts], precision), run_dir / "provenance.json")
    state.wait_for_everyone()
    simulator: DialogueSimulator | None = None
    tokenizer = load_tokenizer(config.policy_model)
    policy_path = resolve_model(config.policy_model)
    engine = PolicyEngine(config)
    for iteration in range(config.iterations):
        iteration_dir = run_dir / f"iteration_{iteration}"
        if (iteration_dir / "metrics.json").exists():  # written last
            logger.info("resuming: iteration %d already trained", iteration)
            policy_path = str(iteration_dir / "policy")
            continue
        stats: dict[str, Any] = {"iteration": iteration, "policy_in": policy_path}
        if state.is_main_process:
            folder.record(iteration, "collection", config)
            simulator = simulator or build_training_simulator(config, engine)
            prepare_pairs(config, simulator, engine, iteration, policy_path)
            folder.record(iteration, "training", config)
        state.wait_for_everyone()
        pairs = read_tokenized_pairs(iteration_dir / "pairs.jsonl")
        stats |= json.loads((iteration_dir / "collection.json").read_text()) | {"pairs": len(pairs)}
        trainer, metrics, scored = train_iteration(config, pairs, policy_path, tokenizer, iteration_dir / "checkpoints")
        trainer.save(iteration_dir / "policy", tokenizer)
        if state.is_main_process:
            write_rows(scored, iteration_dir / "pairs.jsonl", SCORED_PAIR_FEATURES)  # now with π_t's log-probs
            write_json(stats | metrics, iteration_dir / "metrics.json")  # marks the iteration as done
            shutil.rmtree(iteration_dir / "checkpoints", ignore_errors=True)
            _report(iteration_dir, stats | metrics)
        state.wait_for_everyone()
        policy_path = str(iteration_dir / "policy")
    return policy_path


def _report(iteration_dir: Path, metrics: dict[str, Any]) -> None:
    lines = [f"iteration {metrics['iteration']}: {metrics['pairs']} pairs kept, dropped {metrics.get('dropped', {})}"]
    for label, key in (("validation", "validation"), ("training-pair fit", "train_fit")):
        before, after = metrics[f"{key}_before"], metrics[f"{key}_after"]
        lines.append(
            f"  {label}: REFUEL loss {before['loss']:.4f} -> {after['loss']:.4f}, "
            f"sign agreement {before['sign_agreement']:.3f} -> {after['sign_agreement']:.3f}"
        )
    print(
        "\n".join(lines) + "\n"
        f"  pairs:      {iteration_dir / 'pairs.jsonl'}\n"
        f"  checkpoint: {iteration_dir / 'policy'}\n"
        f"  metrics:    {iteration_dir / 'metrics.json'}"
    )


@console_command
def main(argv: list[str]) -> None:
    """Entry point of ``refuel-train`` / ``python -m refuel.training.iterations`` (exit codes: dialogsim.console)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(RefuelConfig, argv, description=__doc__)
    with failure_state(lambda: describe_run(Path(config.output_dir))):
        print(f"final policy: {run(config)}")


if __name__ == "__main__":
    main()
