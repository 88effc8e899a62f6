"""The ``verifiers`` taskset id ``dialogsim_verifiers``: see :mod:`envs.adapters.verifiers_env` (needs the extra).

``verifiers`` 0.4 resolves a taskset id to a top-level module whose ``__all__`` exports one ``Taskset``
and one ``Env`` subclass; dotted ids are not resolved, hence this module.
"""

from envs.adapters.verifiers_env import DialogsimEnv, DialogsimTaskset

__all__ = ["DialogsimEnv", "DialogsimTaskset"]
