"""Build a reward model from a short command-line spec."""

from __future__ import annotations

from collections.abc import Iterable

from dialogsim.console import UsageError
from dialogsim.models import check_model_name
from dialogsim.plugins import REWARD_GROUP, build_plugin, find_plugin, scored_tasks
from dialogsim.rewards.answer_match import LOGIC_TASK, AnswerMatchReward
from dialogsim.rewards.base import RewardModel
from dialogsim.rewards.code_verifier import CODE_TASK, CodeTestReward
from dialogsim.rewards.embedding import SentenceEmbedder
from dialogsim.rewards.function import FunctionReward
from dialogsim.rewards.math_format import MathFormatReward
from dialogsim.rewards.math_reward import MathAnswerReward
from dialogsim.rewards.null import NoReward
from dialogsim.rewards.routed import TaskRoutedReward
from dialogsim.rewards.sequence_classification import SequenceClassificationReward
from dialogsim.rewards.turn_answer import TurnAnswerReward

MATH_SPEC = "math"
MATH_FORMAT_SPEC = "math_format"
CODE_SPEC = "code"
VERIFIER_SPEC = "verifier"
NO_REWARD_SPEC = "none"
TURN_ANSWER_SPEC = "turn_answer"
MATH_TASK_PREFIX = "Math"
BUILTIN_SPECS = (MATH_SPEC, MATH_FORMAT_SPEC, CODE_SPEC, VERIFIER_SPEC, NO_REWARD_SPEC, TURN_ANSWER_SPEC)
# The task prefixes each built-in reward scores (rows of other tasks get NaN); a sequence-classification
# reward model scores every task.
SCORED_TASKS: dict[str, tuple[str, ...]] = {
    MATH_SPEC: (MATH_TASK_PREFIX,),
    MATH_FORMAT_SPEC: (MATH_TASK_PREFIX,),
    CODE_SPEC: (CODE_TASK,),
    VERIFIER_SPEC: (MATH_TASK_PREFIX, CODE_TASK, LOGIC_TASK),
    NO_REWARD_SPEC: (),
    TURN_ANSWER_SPEC: (MATH_TASK_PREFIX,),
}
EXAMPLE_REWARD_MODEL = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
REWARD_FLAG = "--reward"


def build_reward_model(
    spec: str, device: str = "cpu", trust_remote_code: bool = False, dtype: str = "auto"
) -> RewardModel:
    """The reward model named by ``spec``.

    Args:
        spec: one of

            * ``"math"`` (the CPU default): :class:`MathAnswerReward` with the embedded all-MiniLM-L6-v2;
            * ``"math_format"``: :class:`MathFormatReward`, correctness + boxed answer + the reference's
              intermediate quantities − copying the prompt, no model (``Math*`` rows);
            * ``"code"``: :class:`CodeTestReward`, the row's reference tests run on the reply's code in a
              sandboxed process (``Coding`` rows);
            * ``"verifier"``: :class:`TaskRoutedReward` sending ``Math*`` rows to ``"math"``, ``Coding`` rows
              to ``"code"`` and ``Logic`` rows to :class:`AnswerMatchReward` (HotpotQA exact match + token
              F1 against the reference); others NaN;
            * ``"turn_answer"``: :class:`TurnAnswerReward`, the last turn's answer against that turn's reference
              (``meta["turn_references"]``: the arithmetic dialogues) + boxed answer, no model (``Math*`` rows);
            * ``"none"``: :class:`NoReward` (NaN for every dialogue), for dialogue generation only;
            * ``"package.module:name"`` or the name of an installed plugin (entry-point group
              ``dialogsim.rewards``): the user's :class:`RewardModel` class or instance, a factory returning one,
              or a plain function ``(dialogues, rows) -> list[float]`` (wrapped in :class:`FunctionReward`); see
              :mod:`dialogsim.plugins`;
            * otherwise a Hugging Face id / local folder of a sequence-classification reward model, e.g.
              ``"Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"`` or ``"RLHFlow/ArmoRM-Llama3-8B-v0.1"``.
        device: torch device for the model(s).
        trust_remote_code: passed to ``from_pretrained`` for hub reward models with custom code
            (ArmoRM needs ``True``); ignored by the built-in specs.
        dtype: the ``engine_dtype`` setting of the model(s) (:func:`dialogsim.precision.engine_dtype`).

    Raises:
        UsageError: ``spec`` is empty, or names a plugin that cannot be loaded or is not a reward
            (:func:`~dialogsim.plugins.build_plugin`).
    """
    name = spec.strip()
    if not name:
        raise UsageError(
            f"build_reward_model: empty reward spec; pass one of {', '.join(BUILTIN_SPECS)} or a "
            "sequence-classification reward model id or path such as 'RLHFlow/ArmoRM-Llama3-8B-v0.1'"
        )
    builtin = name.lower()
    if builtin == MATH_SPEC:
        return MathAnswerReward(embedder=SentenceEmbedder(device=device, dtype=dtype))
    if builtin == MATH_FORMAT_SPEC:
        return MathFormatReward()
    if builtin == CODE_SPEC:
        return CodeTestReward()
    if builtin == VERIFIER_SPEC:
        math_reward = MathAnswerReward(embedder=SentenceEmbedder(device=device, dtype=dtype))
        return TaskRoutedReward(
            {MATH_TASK_PREFIX: math_reward, CODE_TASK: CodeTestReward(), LOGIC_TASK: AnswerMatchReward()}
        )
    if builtin == NO_REWARD_SPEC:
        return NoReward()
    if builtin == TURN_ANSWER_SPEC:
        return TurnAnswerReward()
    plugin = find_plugin(name, REWARD_GROUP, REWARD_FLAG)
    if plugin is not None:
        return build_plugin(plugin, name, REWARD_FLAG, RewardModel, 2, FunctionReward)
    return SequenceClassificationReward(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def check_reward_scores(spec: str, tasks: Iterable[str] | None, generation_only: bool = False) -> None:
    """Refuse, before anything is generated, a reward that cannot be found or cannot score every selected task.

    Built-in rewards score the task prefixes of :data:`SCORED_TASKS` (NaN elsewhere, so every pair of
    those rows would be dropped as ``invalid_reward`` after the whole collection); a reward plugin scores the
    prefixes of its ``scored_tasks`` attribute, every task without one (:func:`~dialogsim.plugins.scored_tasks`;
    only its module is imported, nothing is built); a sequence-classification reward model scores every task and
    its name is checked (:func:`~dialogsim.models.check_model_name`, offline: in the local cache). ``"none"``
    scores nothing: it is accepted only for generation.

    Args:
        spec: a :func:`build_reward_model` spec (the ``--reward`` value).
        tasks: the selected UltraInteract tasks (``--tasks``, or the tasks of the loaded rows); ``None``
            (every task of the prompt file, not known before loading) checks only ``"none"``.
        generation_only: the caller only generates dialogues (the env, ``refuel-evaluate``'s dialogues),
            so ``"none"`` is fine.

    Raises:
        UsageError: names the reward, the tasks it cannot score, the tasks it can and the ``--reward`` to use; or
            the plugin or model that cannot be found.
    """
    name = spec.strip()
    builtin = name.lower()
    if builtin == NO_REWARD_SPEC and generation_only:
        return
    prefixes = SCORED_TASKS[builtin] if builtin in SCORED_TASKS else _plugin_or_model_tasks(name)
    if prefixes is None:
        return
    selected = sorted(set(tasks)) if tasks is not None else []
    unscored = [task for task in selected if not task.startswith(prefixes)]
    if builtin != NO_REWARD_SPEC and not unscored:
        return
    covering = [
        name for name, prefixes in SCORED_TASKS.items() if selected and all(t.startswith(prefixes) for t in selected)
    ]
    fix = " or ".join(f"--reward {name}" for name in covering) or (
        f"--reward <a sequence-classification reward model id or folder, e.g. {EXAMPLE_REWARD_MODEL}> (scores any task)"
    )
    if builtin == NO_REWARD_SPEC:
        raise UsageError(
            "--reward none scores no dialogue: it is for generating dialogues only (the env, refuel-evaluate), "
            f"and training would drop every pair; pass {fix}"
        )
    scored = ", ".join(f"{p}*" if p == MATH_TASK_PREFIX else p for p in prefixes)
    shown = builtin if builtin in SCORED_TASKS else name
    raise UsageError(
        f"--reward {shown} scores only {scored} rows, not the selected task(s) {', '.join(unscored)} (their "
        f"rewards would all be NaN and every pair dropped); pass {fix}, or select scorable tasks with --tasks"
    )


def _plugin_or_model_tasks(spec: str) -> tuple[str, ...] | None:
    """The task prefixes the reward plugin ``spec`` scores (``None``: every task), or ``None`` for a reward model
    whose name :func:`~dialogsim.models.check_model_name` accepts.

    Raises:
        UsageError: a plugin that cannot be loaded, or a model name that is not valid (or, offline, not cached).
    """
    plugin = find_plugin(spec, REWARD_GROUP, REWARD_FLAG)
    if plugin is None:
        check_model_name("reward", spec)
        return None
    return scored_tasks(plugin)
