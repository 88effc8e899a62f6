"""Gymnasium environments of dialogsim; importing this package registers them.

>>> import gymnasium as gym, envs
>>> env = gym.make("dialogsim/UltraInteract-v0")  # doctest: +SKIP
"""

import gymnasium as gym

from envs.dialogue_env import DialogueEnv
from envs.vector_env import VectorDialogueEnv

ENV_ID = "dialogsim/UltraInteract-v0"
TABULAR_ENV_ID = "dialogsim/TabularDialogue-v0"

if ENV_ID not in gym.registry:
    gym.register(
        id=ENV_ID,
        entry_point="envs.dialogue_env:DialogueEnv",
        vector_entry_point="envs.vector_env:VectorDialogueEnv",
        disable_env_checker=False,
    )

if TABULAR_ENV_ID not in gym.registry:
    gym.register(
        id=TABULAR_ENV_ID,
        entry_point="envs.tabular:TabularDialogueEnv",
        vector_entry_point="envs.tabular:TabularVectorDialogueEnv",
        disable_env_checker=False,
    )

__all__ = ["ENV_ID", "TABULAR_ENV_ID", "DialogueEnv", "VectorDialogueEnv"]
