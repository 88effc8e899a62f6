"""A tabular multi-turn dialogue MDP behind the same simulator, environment and REFUEL code path as the LLM env.

- :mod:`envs.tabular.mdp`: :class:`TabularDialogueMDP`, states read from the dialogue's messages, the user
  and reward tables (the default :meth:`TabularDialogueMDP.clarify_first`).
- :mod:`envs.tabular.simulator`: the table-backed policy, user, reward model and tokenizer, and
  :func:`build_tabular_simulator`, an ordinary :class:`~dialogsim.simulator.DialogueSimulator` on them.
- :mod:`envs.tabular.env`: the Gymnasium environments (``dialogsim/TabularDialogue-v0``).

Its exact dynamic programming is :mod:`refuel.tabular.dynamic_programming`; the algorithm side (the
mirror-descent update, the REFUEL regression on a table, the training loop) is :mod:`refuel.tabular.mirror_descent`.
"""

from envs.tabular.env import ReplyChoice, TabularDialogueEnv, TabularVectorDialogueEnv
from envs.tabular.mdp import DTYPE, REPLIES, USER_MESSAGES, TabularDialogueError, TabularDialogueMDP
from envs.tabular.simulator import (
    PROMPT_ID,
    TabularPolicy,
    TabularReward,
    TabularTokenizer,
    TabularUser,
    build_tabular_simulator,
    reference_logits,
)

__all__ = [
    "DTYPE",
    "PROMPT_ID",
    "REPLIES",
    "USER_MESSAGES",
    "ReplyChoice",
    "TabularDialogueEnv",
    "TabularDialogueError",
    "TabularDialogueMDP",
    "TabularPolicy",
    "TabularReward",
    "TabularTokenizer",
    "TabularUser",
    "TabularVectorDialogueEnv",
    "build_tabular_simulator",
    "reference_logits",
]
