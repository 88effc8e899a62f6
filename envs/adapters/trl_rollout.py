"""The dialogue environment as the rollout source of TRL's ``GRPOTrainer`` (its ``rollout_func`` hook).

Needs the ``trl`` extra (``pip install "dialogsim[trl]"``). TRL 1.16 offers two hooks: ``environment_factory``
(an environment whose methods the model calls as *tools*, with an optional ``get_reward``) and
``rollout_func(prompts, trainer)`` (the caller generates whole completions). A simulated user is not a
tool the policy calls: it speaks after every reply, so the environment is a ``rollout_func``:

- each prompt (one per completion, GRPO's repeats included) starts a :class:`~envs.DialogueEnv` episode on
  the prompt row with that instruction; the trainer's own model replies (sampled at the trainer's
  temperature) until the horizon;
- ``completion_ids`` is the whole conversation after the first user turn: each turn's generated reply
  ids (``env_mask`` 1, trained) followed by the chat-template tokens of the simulated user's next message
  (``env_mask`` 0, not trained; log-prob 0);
- the environment's reward at the horizon comes back in the ``dialogsim_reward`` field, which
  :func:`dialogsim_reward` hands to GRPO as its reward function (NaN → ``None``: not scored); the
  ``dialogue`` field holds the whole conversation (chat format) for logging.

>>> from trl import GRPOConfig, GRPOTrainer
>>> from envs.adapters.trl_rollout import DialogueRollout, dialogsim_reward, prompt_dataset
>>> rollout = DialogueRollout(simulator, max_new_tokens=256)                  # doctest: +SKIP
>>> trainer = GRPOTrainer(model=policy, reward_funcs=dialogsim_reward, train_dataset=prompt_dataset(simulator),
...                       rollout_func=rollout, args=GRPOConfig(num_generations=8))  # doctest: +SKIP

Not mapped: TRL's vLLM generation (``use_vllm``) is bypassed (replies come from ``trainer.model.generate``,
one dialogue at a time), and REFUEL's reset to a turn h (GRPO scores whole dialogues from s_1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import chat_prompt_ids
from dialogsim.messages import Message
from dialogsim.prompts import instruction_key
from dialogsim.simulator import DialogueSimulator
from envs.dialogue_env import DialogueEnv

REWARD_FIELD = "dialogsim_reward"


def prompt_dataset(simulator: DialogueSimulator) -> Dataset:
    """GRPO's ``train_dataset``: one conversational ``prompt`` (the first user message) per prompt row."""
    rows = simulator.prompts.values()
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": row.instruction}] for row in rows]})


def dialogsim_reward(completions: list[Any], **kwargs: Any) -> list[float | None]:
    """GRPO reward function: the environment's reward of each dialogue (``None`` where it is NaN)."""
    return [None if math.isnan(reward) else reward for reward in kwargs[REWARD_FIELD]]


class DialogueRollout:
    """A ``rollout_func`` for ``GRPOTrainer``: one dialogue with the simulated user per prompt.

    Args:
        simulator: prompts, simulated user, reward and episode rules (horizon, token budget).
        max_new_tokens: reply length cap per turn (tokens).
        seed: seed of the episodes' horizons and user draws.
    """

    def __init__(self, simulator: DialogueSimulator, max_new_tokens: int = 256, seed: int = 0) -> None:
        self.simulator = simulator
        self.max_new_tokens = max_new_tokens
        self.rng = np.random.default_rng(seed)
        self.prompt_ids = {}
        for row in simulator.prompts.values():
            self.prompt_ids.setdefault(instruction_key(row.instruction), row.id)

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        """Run one dialogue per prompt with ``trainer``'s model; returns GRPO's rollout fields (see module doc).

        Raises:
            KeyError: a prompt whose instruction is not among the simulator's prompt rows.
            ValueError: a prompt that is not one user message.
        """
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer = trainer.processing_class
        fields: dict[str, list[Any]] = {
            key: [] for key in ("prompt_ids", "completion_ids", "logprobs", "env_mask", REWARD_FIELD, "dialogue")
        }
        for prompt in prompts:
            episode = self._episode(self._prompt_id(prompt), model, tokenizer, trainer.temperature)
            for key, value in episode.items():
                fields[key].append(value)
        return fields

    def _prompt_id(self, prompt: Any) -> str:
        if not (isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user"):
            raise ValueError(
                f"each GRPO prompt must be one user message (prompt_dataset's format), got {prompt!r:.120}"
            )
        key = instruction_key(prompt[0]["content"])
        if key not in self.prompt_ids:
            raise KeyError(f"prompt {prompt[0]['content']!r:.80} is not among the simulator's prompt rows")
        return self.prompt_ids[key]

    @torch.no_grad()
    def _episode(
        self, prompt_id: str, model: Any, tokenizer: PreTrainedTokenizerBase, temperature: float
    ) -> dict[str, Any]:
        env = DialogueEnv(simulator=self.simulator)
        observation, _ = env.reset(seed=int(self.rng.integers(2**31)), options={"prompt_id": prompt_id})
        messages: list[Message] = list(observation)
        context = chat_prompt_ids(tokenizer, messages)
        prompt_ids, completion_ids, logprobs, env_mask = list(context), [], [], []
        reward, done = math.nan, False
        while not done:
            reply_ids, reply_logprobs = _sample(model, tokenizer, context, temperature, self.max_new_tokens)
            reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
            observation, reward, terminated, truncated, _ = env.step(reply)
            done = terminated or truncated
            completion_ids += reply_ids
            logprobs += reply_logprobs
            env_mask += [1] * len(reply_ids)
            if not done:
                user_ids = _user_turn_ids(tokenizer, messages, reply, list(observation), reply_ids)
                completion_ids += user_ids
                logprobs += [0.0] * len(user_ids)
                env_mask += [0] * len(user_ids)
                messages = list(observation)
                context = prompt_ids + completion_ids
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": logprobs,
            "env_mask": env_mask,
            REWARD_FIELD: float(reward),
            "dialogue": [dict(message) for message in observation],
        }


def _sample(
    model: Any, tokenizer: PreTrainedTokenizerBase, context: list[int], temperature: float, max_new_tokens: int
) -> tuple[list[int], list[float]]:
    """One sampled reply: its token ids and their log-probs under the temperature-scaled policy."""
    input_ids = torch.tensor([context], device=model.device)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    reply_ids = output.sequences[0, len(context) :]  # one sequence: no padding, it ends at EOS or the cap
    logprobs = model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)[0]
    return reply_ids.tolist(), logprobs.tolist()


def _user_turn_ids(
    tokenizer: PreTrainedTokenizerBase,
    before: list[Message],
    reply: str,
    after: list[Message],
    reply_ids: list[int],
) -> list[int]:
    """Chat-template tokens between the reply and the next generation prompt: the end of the assistant
    turn, the simulated user's message, the assistant header (ids of the template's own text).

    Raises:
        ValueError: the chat template does not render the reply text verbatim after s_h.
    """
    start = tokenizer.apply_chat_template(before, add_generation_prompt=True, tokenize=False)
    end = tokenizer.apply_chat_template(after, add_generation_prompt=True, tokenize=False)
    if not end.startswith(start + reply):
        raise ValueError(
            "the policy's chat template does not render s_h followed by the reply text verbatim (it edits the "
            "content, e.g. strips it), so the user turn's tokens cannot be placed after the generated reply ids"
        )
    user_ids = tokenizer(end[len(start) + len(reply) :], add_special_tokens=False)["input_ids"]
    if reply_ids and user_ids and reply_ids[-1] == user_ids[0] == tokenizer.eos_token_id:
        user_ids = user_ids[1:]  # the policy closed its own turn: that end token is its (trained) action
    return user_ids
