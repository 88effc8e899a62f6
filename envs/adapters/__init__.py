"""Adapters that put the dialogue environment into other trainers' and servers' APIs.

Each module needs its own optional extra and imports nothing optional at package import:

- :mod:`envs.adapters.openenv_server`: an OpenEnv HTTP/WebSocket server for
  :class:`~envs.DialogueEnv`, its client, and :class:`~envs.adapters.openenv_server.RemoteSimulator`,
  which lets :class:`~envs.VectorDialogueEnv` drive remote env workers (``pip install "dialogsim[openenv]"``);
- :mod:`envs.adapters.verifiers_env`: a ``verifiers`` taskset and environment in which the simulated
  user answers the policy and the dialogsim reward scores the dialogue (``pip install "dialogsim[verifiers]"``);
- :mod:`envs.adapters.trl_rollout`: a ``rollout_func`` that makes the environment the rollout source
  of TRL's ``GRPOTrainer`` (``pip install "dialogsim[trl]"``).
"""
