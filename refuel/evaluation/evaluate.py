"""``refuel-evaluate``: per-turn win rates of candidate policies against a baseline policy.

Prompts: the first ``--n_prompts`` of the ``--holdout`` rows that ``refuel-train`` never trained on, or with
``--prompts <file> --all_rows`` every row of a test file that passes the filters (``--tasks all`` keeps every
task); the rows dropped are printed by reason. Policies are labelled from their run's metadata
(:mod:`refuel.evaluation.policy_names`: ``π_0``, ``REFUEL π_1``, ``REBEL-LT π_1`` ...), not by folder name.

Three separate steps:

1. **Generate** (cached). For each held-out prompt, every policy talks to the same simulated user with
   the same seeds for H turns. Each policy's dialogues are written once to
   ``<output_dir>/dialogues/<method>-<key>.jsonl``, the key covering the policy's weights and every
   setting that shapes the dialogues (not the judge), so re-judging with another judge regenerates nothing.
2. **Judge** the cached dialogues: for every candidate, prompt and turn h, a pairwise judge
   (``--judge reward``: the ``--reward`` model scores both dialogues truncated at h, ties ½; ``--judge
   llm``: a chat model on any backend compares them in both orders) gives P(candidate is better).

3. **Diagnose** every policy's own cached dialogues (baseline included) at every turn h, independently of the
   judge (:mod:`refuel.evaluation.diagnostics`): mean ``--reward`` score, final-answer accuracy, test pass rate,
   requested format followed, reply length in tokens, prompt copying and the simulated user's fallback rate.

``<output_dir>/provenance.json`` records the package versions, the models' weight hashes, the prompt file's hash and
the engine precision (``--engine_dtype``: the dtype every engine ran in, and why).

Outputs in ``<output_dir>/<judge name>/``: the win rate per turn h with bootstrap 95 % intervals, printed in
the paper's layout (rows = methods, columns = h=1..H, avg) with the judged pairs per turn and the judge's
tie / position-bias / invalid rates, then the diagnostics table; ``win_rates.csv``, ``win_rates.png``,
``judgements.csv``, ``judge_stats.csv``, ``diagnostics.csv``, ``diagnostics.png`` and ``report.html`` (the
tables and plots, and every dialogue pair side by side with its judgements).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dialogsim.backends.serving import ServingEngine, resolve_user_backend, user_engine
from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.console import UsageError, console_command, failure_state
from dialogsim.data import check_prompt_source, load_prompt_rows
from dialogsim.dialogue import fingerprint
from dialogsim.judges.base import JudgePair, PairwiseJudge
from dialogsim.judges.factory import JUDGES, build_judge, find_judge_plugin
from dialogsim.judges.reward_judge import RewardModelJudge
from dialogsim.messages import Message
from dialogsim.models import check_model_name, resolve_model
from dialogsim.precision import backend_precision
from dialogsim.prompts import PromptRow
from dialogsim.rewards.code_verifier import CodeTestReward
from dialogsim.rewards.factory import NO_REWARD_SPEC, build_reward_model, check_reward_scores
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator
from envs.build import build_simulator
from refuel.cli import parse_config
from refuel.collection.rollout import PolicyRun, run_policies
from refuel.config import GENERATION_FIELDS, EvaluateConfig
from refuel.evaluation.diagnostics import diagnostics_frame, policy_diagnostics, save_diagnostics
from refuel.evaluation.policy_names import method_name, policy_labels
from refuel.evaluation.report import write_html_report
from refuel.evaluation.winrate import count_table, judge_statistics, paper_table, per_turn_win_rates, save_report
from refuel.provenance import run_provenance
from refuel.storage import read_rows, write_json, write_rows

logger = logging.getLogger(__name__)


def policy_identity(policy: str) -> dict[str, Any]:
    """What identifies a policy's weights for the dialogue cache: resolved path, weight files' sizes and times."""
    folder = Path(resolve_model(policy))
    if not folder.is_dir():
        return {"name": policy}
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return {"path": str(folder.resolve()), "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def dialogue_cache(config: EvaluateConfig, policy: str) -> Path:
    """``<output_dir>/dialogues/<name>-<key>.jsonl``; the key covers the policy's weights and generation settings.

    ``name`` is only for reading: the policy's own folder name
    (:func:`~refuel.evaluation.policy_names.method_name`), which does not depend on the policies evaluated beside
    it, so the same policy finds its cache in any candidate set; the key tells policies of the same name apart. The
    key holds the user's engine kind (``user_backend="auto"`` resolved), not whether it shares the policy's.
    """
    name = method_name(policy)
    user_backend = resolve_user_backend(config.user_backend, config.backend)
    settings = {field: getattr(config, field) for field in GENERATION_FIELDS} | {"user_backend": user_backend}
    key = fingerprint({"generation": fingerprint(settings), "policy": policy_identity(policy)})
    return Path(config.output_dir) / "dialogues" / f"{name.replace('/', '_')}-{key}.jsonl"


def generate_dialogues(
    config: EvaluateConfig, simulator: DialogueSimulator, engine: ServingEngine, caches: Mapping[str, Path]
) -> dict[str, list[dict[str, Any]]]:
    """Dialogues of each policy on the held-out prompts (each policy's cached in its own file).

    Every policy starts from identical states (same prompt, horizon and user RNG per prompt) and the
    same policy-sampling seed sequence, so the only difference between methods is the policy. The
    policies whose cache misses are generated together (:func:`~refuel.collection.rollout.run_policies`): per
    turn one call per policy on ``engine`` (its weights swapped in), then one simulated-user call for
    every policy's dialogues. The engine is started or given a policy's weights only when its cache misses.

    Args:
        caches: policy (name, folder or hub id) → its cache file (:func:`dialogue_cache`).

    Returns:
        Per policy, one row per prompt: ``prompt_id``, ``horizon``, ``truncated`` and ``messages``.
    """
    runs = {}
    for policy, cache in caches.items():
        if cache.exists():
            logger.info("reusing cached dialogues %s", cache)
            continue
        states = [
            simulator.new_state(
                np.random.default_rng([config.seed, index]), {"prompt_id": prompt_id, "horizon": config.horizon}
            )
            for index, prompt_id in enumerate(simulator.prompt_ids)
        ]
        runs[policy] = PolicyRun(engine.role(policy), states, np.random.default_rng(config.seed))
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens)
    started = time.perf_counter()
    run_policies(simulator, list(runs.values()), sampling)
    if runs:
        logger.info(
            "dialogues of %d policies generated in %.1f s (%d live weight syncs, %.1f s)",
            len(runs),
            time.perf_counter() - started,
            engine.weight_syncs,
            engine.weight_sync_seconds,
        )
    for policy, run in runs.items():
        rows = [
            {"prompt_id": s.prompt_id, "horizon": s.horizon, "truncated": s.truncated, "messages": s.messages}
            for s in run.states
        ]
        write_rows(rows, caches[policy])
    return {policy: read_rows(cache) for policy, cache in caches.items()}


def judge_dialogues(
    judge: PairwiseJudge,
    dialogues: Mapping[str, Mapping[str, list[Message]]],
    baseline: str,
    prompts: Mapping[str, PromptRow],
    horizon: int,
) -> pd.DataFrame:
    """Every candidate's dialogue against the baseline's, at every turn h = 1..H, in one judge call.

    Args:
        judge: any pairwise judge; the candidate's dialogue is its ``first``, the baseline's its ``second``.
        dialogues: method name → prompt id → messages; ``baseline`` is one of the methods, the others are
            the candidates.
        baseline: the baseline's method name.
        prompts: prompt id → prompt row.
        horizon: H.

    Returns:
        One row per (candidate method, prompt id, turn): ``method``, ``prompt_id``, ``turn``, ``outcome``
        (P(candidate is better): 1 win, ½ tie, 0 loss, NaN invalid), ``reason`` (why NaN) and the judge's
        detail columns (``score_first`` / ``score_second``, or ``verdict_ab`` / ``verdict_ba`` /
        ``comparison_ab`` / ``comparison_ba``; first and A-in-``ab`` = the candidate).

    Raises:
        KeyError: a candidate lacks a dialogue for one of the baseline's prompts.
    """
    keys, pairs = [], []
    for method, by_prompt in dialogues.items():
        if method == baseline:
            continue
        for prompt_id, reference in dialogues[baseline].items():
            for turn in range(1, horizon + 1):
                keys.append({"method": method, "prompt_id": prompt_id, "turn": turn})
                pairs.append(JudgePair(by_prompt[prompt_id], reference, turn, prompts[prompt_id]))
    judgements = judge.judge(pairs)
    return pd.DataFrame(
        [
            {**key, "outcome": judgement.probability, "reason": judgement.reason, **judgement.details}
            for key, judgement in zip(keys, judgements, strict=True)
        ]
    )


def check_policies(config: EvaluateConfig) -> None:
    """Check every model name of ``config`` (:func:`~dialogsim.models.check_model_name`), the reward and the judge
    before anything loads.

    Raises:
        UsageError: a candidate, the baseline, the user, the LLM judge or the reward model is neither a known name,
            an existing folder nor a hub id (offline: nor in the local Hugging Face cache; e.g. a candidate's
            ``policy`` folder that a training run never wrote); a reward or judge plugin cannot be loaded.
    """
    names = [("baseline", config.baseline), *(("candidates", candidate) for candidate in config.candidates)]
    if config.user_backend != "openai":
        names.append(("user_model", config.user_model))
    if config.judge == "llm" and config.judge_backend != "openai":
        names.append(("judge_model", config.judge_model))
    for field_name, name in names:
        check_model_name(field_name, name)
    check_reward_scores(config.reward, None, generation_only=True)  # its name; its tasks once the rows are known
    if config.judge not in JUDGES:
        find_judge_plugin(config.judge)


def evaluate(config: EvaluateConfig) -> dict[str, Path]:
    """Generate (or reuse) dialogues, judge every turn, diagnose every policy, print the tables, write the reports.

    Returns:
        Paths of ``csv`` (win rates), ``png``, ``judgements``, ``judge_stats``, ``diagnostics`` (CSV),
        ``diagnostics_png`` and ``html``, all in ``<output_dir>/<judge name>/``.

    Raises:
        UsageError: before any dialogue is generated: the prompt source is missing
            (:class:`~dialogsim.data.PromptsNotFoundError`), a model name, the reward or the judge is invalid
            (:func:`check_policies`), the prompt selection is (:func:`evaluation_prompts`), or ``--judge reward``
            comes with a ``--reward`` that cannot score the selected tasks
            (:func:`~dialogsim.rewards.factory.check_reward_scores`).
    """
    check_prompt_source(config.prompts)
    check_policies(config)
    precision = backend_precision(config.engine_dtype, config.backend)  # logged once
    policies = [config.baseline, *config.candidates]
    names = policy_labels(policies)
    rows, description = evaluation_prompts(config)
    if config.judge == "reward":  # the judge scores with --reward: refuse it now if it cannot score the tasks
        check_reward_scores(config.reward, {row.task for row in rows})
    models = {"baseline": config.baseline, "user": config.user_model} | {
        f"candidate {index}": candidate for index, candidate in enumerate(config.candidates)
    }
    write_json(run_provenance(models, [config.prompts], precision), Path(config.output_dir) / "provenance.json")
    engine = ServingEngine(
        config.backend,
        dtype=config.engine_dtype,
        kv_cache_gib=config.vllm_kv_cache_gib,
        tensor_parallel_size=config.vllm_tensor_parallel_size,
    )
    simulator = build_simulator(
        config,
        reward=NO_REWARD_SPEC,  # generation needs no reward; the judge brings its own
        rows=rows,
        policy_model=config.baseline,
        max_horizon=config.horizon,
        horizon=config.horizon,
        user_engine=user_engine(config.user_backend, engine, list(names), config.user_model),
    )
    generated = generate_dialogues(config, simulator, engine, {p: dialogue_cache(config, p) for p in policies})
    dialogues = {names[p]: {row["prompt_id"]: row["messages"] for row in generated[p]} for p in policies}
    judge = build_judge(
        config.judge,
        reward=config.reward,
        trust_remote_code=config.trust_remote_code,
        backend=config.judge_backend,
        model=config.judge_model,
        base_url=config.judge_base_url,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=config.judge_max_new_tokens, seed=config.seed),
        template=config.judge_template,
        dtype=config.engine_dtype,
    )
    judgements = judge_dialogues(judge, dialogues, names[config.baseline], simulator.prompts, config.horizon)
    diagnostics = diagnose_policies(config, judge, names, dialogues, simulator.prompts)
    return write_reports(config, judge.name, names[config.baseline], judgements, dialogues, diagnostics, description)


def evaluation_prompts(config: EvaluateConfig) -> tuple[list[PromptRow], str]:
    """The prompt rows to evaluate on, and one line saying which they are and what was dropped, by reason.

    ``--all_rows``: every row of ``--prompts`` that passes the filters; otherwise the first ``n_prompts`` of
    the ``holdout`` rows (chosen by id hash, as ``refuel-train`` chose them). The prompt token budget is
    counted with the baseline's tokenizer. The line is printed and shown in the HTML report.

    Raises:
        UsageError: ``--all_rows`` without ``--prompts`` (the default set holds the training prompts).
        ValueError: no row left; what :func:`dialogsim.data.load_prompt_rows` raises.
    """
    if config.all_rows and config.prompts is None:
        raise UsageError(
            "--all_rows evaluates every row of a given file, but --prompts is unset: the default prompt set holds "
            "the training prompts; pass --prompts <your test file>, or drop --all_rows to use the held-out rows"
        )
    rows, report = load_prompt_rows(
        config,
        load_tokenizer(config.baseline),
        "all" if config.all_rows else "heldout",
        None if config.all_rows else config.n_prompts,
    )
    if config.all_rows:
        description = f"all {len(rows)} rows that pass the filters ({report})"
    else:
        description = f"{len(rows)} of the {config.holdout} held-out rows, by id hash ({report})"
    print(f"prompts: {description}")
    return rows, description


def diagnose_policies(
    config: EvaluateConfig,
    judge: PairwiseJudge,
    names: Mapping[str, str],
    dialogues: Mapping[str, Mapping[str, list[Message]]],
    prompts: Mapping[str, PromptRow],
) -> pd.DataFrame:
    """The :mod:`refuel.evaluation.diagnostics` of every policy's cached dialogues at every turn h = 1..H.

    A reward judge's reward model scores the diagnostics too (loaded once); with an LLM judge the ``--reward``
    model is built for them. Each policy's reply lengths are counted with its own tokenizer.

    Args:
        config: the evaluation's settings (``reward``, ``trust_remote_code``, ``horizon``).
        judge: the judge of this evaluation.
        names: policy (name or path) → method name, baseline included.
        dialogues: method name → prompt id → messages.
        prompts: prompt id → prompt row.

    Returns:
        :func:`refuel.evaluation.diagnostics.diagnostics_frame`, one row per (method, turn), methods in ``names`` order.
    """
    reward = (
        judge.reward
        if isinstance(judge, RewardModelJudge)
        else build_reward_model(config.reward, trust_remote_code=config.trust_remote_code, dtype=config.engine_dtype)
    )
    code_tests = CodeTestReward()
    return diagnostics_frame(
        record
        for policy, name in names.items()
        for record in policy_diagnostics(
            name,
            dialogues[name],
            prompts,
            config.horizon,
            reward=reward,
            tokenizer=load_tokenizer(policy),
            code_tests=code_tests,
        )
    )


def write_reports(
    config: EvaluateConfig,
    judge_name: str,
    baseline: str,
    judgements: pd.DataFrame,
    dialogues: Mapping[str, Mapping[str, list[Message]]],
    diagnostics: pd.DataFrame,
    prompts: str,
) -> dict[str, Path]:
    """Print the win-rate, count, judge and diagnostics tables; write CSVs, PNGs and HTML into
    ``<output_dir>/<judge_name>``.

    Args:
        diagnostics: :func:`refuel.evaluation.diagnostics.diagnostics_frame` of every policy, baseline included.
        prompts: which prompts were evaluated and what was dropped (:func:`evaluation_prompts`).
    """
    out = Path(config.output_dir) / judge_name
    rates = per_turn_win_rates(judgements, seed=config.seed)
    table, counts, stats = paper_table(rates), count_table(rates), judge_statistics(judgements)
    print(f"win rate (%) vs {baseline}, judge {judge_name}, ties = 1/2, bootstrap 95 % intervals")
    print(table.to_string())
    print("judged pairs per turn (dialogues whose pair was judged; invalid ones excluded from the rate)")
    print(counts.to_string())
    print("judge behaviour (rates in %)")
    print(stats.to_string(index=False, float_format="{:.1f}".format))
    print(f"per-turn diagnostics of each policy's own dialogues (reward {config.reward}; rates in %)")
    print(diagnostics.to_string(index=False, float_format="{:.1f}".format, formatters={"reward": "{:.3f}".format}))
    title = f"per-turn win rate vs {baseline} (judge {judge_name})"
    paths = save_report(rates, out, title=f"per-turn win rate vs {baseline}\njudge {judge_name}")
    paths |= save_diagnostics(diagnostics, out, title=f"per-turn diagnostics (reward {config.reward})")
    paths["judgements"] = out / "judgements.csv"
    judgements.to_csv(paths["judgements"], index=False)
    paths["judge_stats"] = out / "judge_stats.csv"
    stats.to_csv(paths["judge_stats"], index=False)
    paths["html"] = write_html_report(
        out / "report.html",
        title=title,
        settings=_report_settings(config, judge_name, prompts),
        baseline=baseline,
        rates=table,
        counts=counts,
        judge_stats=stats,
        judgements=judgements,
        dialogues=dialogues,
        plot=paths["png"],
        diagnostics=diagnostics,
        diagnostics_plot=paths["diagnostics_png"],
    )
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return paths


def _report_settings(config: EvaluateConfig, judge_name: str, prompts: str) -> dict[str, Any]:
    return {
        "judge": judge_name,
        "baseline": config.baseline,
        "candidates": ", ".join(config.candidates),
        "prompts": f"{config.prompts or 'the default prompt set'} (tasks {config.tasks}, datasets {config.datasets}, "
        f"splits {config.splits}): {prompts}",
        "horizon": config.horizon,
        "policy sampling": f"temperature {config.temperature}, top_p {config.top_p}, "
        f"{config.max_new_tokens} new tokens",
        "policy engine": config.backend,
        "simulated user": f"{config.user_model}, template '{config.user_template}', engine {config.user_backend}",
        "seed": config.seed,
    }


def evaluation_state(output_dir: Path) -> str:
    """One line on what a failed evaluation left in ``output_dir``: the policies whose dialogues are cached."""
    cached = sorted((output_dir / "dialogues").glob("*.jsonl"))
    if not cached:
        return f"no dialogues cached in {output_dir}"
    return f"{len(cached)} policies' dialogues cached in {output_dir / 'dialogues'}; the same command reuses them"


@console_command
def main(argv: list[str]) -> None:
    """Entry point of ``refuel-evaluate`` / ``python -m refuel.evaluation.evaluate`` (exit codes: dialogsim.console)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(EvaluateConfig, argv, description=__doc__)
    with failure_state(lambda: evaluation_state(Path(config.output_dir))):
        evaluate(config)


if __name__ == "__main__":
    main()
