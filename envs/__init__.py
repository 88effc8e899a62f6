"""Gymnasium environments of dialogsim; importing this package registers them.

>>> import gymnasium as gym, envs
>>> env = gym.make("dialogsim/UltraInteract-v0")  # doctest: +SKIP
"""

import gymnasium as gym

from envs.dialogue_env import DialogueEnv
from envs.vector_env import VectorDialogueEnv

ENV_ID = "dialogsim/UltraInteract-v0"
TABULAR_ENV_ID = "dialogsim/TabularDialogue-v0"

# id → (single env, native vector env)
ENTRY_POINTS = {
    ENV_ID: ("envs.dialogue_env:DialogueEnv", "envs.vector_env:VectorDialogueEnv"),
    TABULAR_ENV_ID: ("envs.tabular.env:TabularDialogueEnv", "envs.tabular.env:TabularVectorDialogueEnv"),
}
for env_id, (entry_point, vector_entry_point) in ENTRY_POINTS.items():
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=entry_point, vector_entry_point=vector_entry_point)

__all__ = ["ENV_ID", "TABULAR_ENV_ID", "DialogueEnv", "VectorDialogueEnv"]
