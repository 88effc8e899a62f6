"""dialogsim: the simulator core for multi-turn RLHF with a simulated user.

Dialogue state, chat-generation backends, the user simulator, reward models and prompt datasets.
No RL algorithm lives here (see :mod:`refuel`).
"""

from dialogsim.messages import Message, validate_messages
from dialogsim.sampling import SamplingParams

__all__ = ["Message", "SamplingParams", "validate_messages"]
