"""The table-backed pieces a :class:`~dialogsim.simulator.DialogueSimulator` runs the tabular MDP with.

Only the policy and the user differ from the LLM setting: replies and user messages are short strings
(``"a0".."a2"``, ``"u0"``, ``"u1"``), the policy is a softmax table over dialogue states
(:class:`TabularPolicy`, a :class:`~dialogsim.backends.base.ChatBackend`), the user samples its next
message from a transition table (:class:`TabularUser`), the reward model looks the score of the
complete dialogue up in a table (:class:`TabularReward`) and :class:`TabularTokenizer` gives each role
and text one token. :func:`build_tabular_simulator` puts them into an ordinary
:class:`~dialogsim.simulator.DialogueSimulator`, so ``refuel.collection.collect.collect_pairs`` and the Gymnasium
environments (:mod:`envs.tabular.env`) run on it unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from dialogsim.backends.base import Completion
from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import UserTemplate, UserTurn
from envs.tabular.mdp import DTYPE, TabularDialogueError, TabularDialogueMDP

PROMPT_ID = "tabular-0"


def reference_logits(mdp: TabularDialogueMDP, probs: Sequence[float] = (0.05, 0.35, 0.6)) -> torch.Tensor:
    """Logits of the base policy π_0 = π_ref: the same reply probabilities at every state.

    The default prefers the generic reply and rarely asks a clarifying question, so the states after a
    turn-1 question are rarely visited by π_0.

    Returns:
        ``[n_states, n_replies]`` logits (nats).

    Raises:
        ValueError: ``probs`` is not a distribution over the replies with full support.
    """
    p = torch.as_tensor(probs, dtype=DTYPE)
    if p.shape != (mdp.n_replies,) or (p <= 0).any() or abs(float(p.sum()) - 1.0) > 1e-9:
        raise ValueError(f"probs must be {mdp.n_replies} positive probabilities summing to 1, got {list(probs)}")
    return p.log().expand(mdp.n_states, -1).clone()


class TabularPolicy:
    """A softmax-table policy as a :class:`~dialogsim.backends.base.ChatBackend`.

    π(a | s) = softmax(logits[s] / temperature)[a], with the state s read from the conversation's
    messages (:meth:`TabularDialogueMDP.state_index`). One ``chat`` call samples the whole batch from one
    ``torch.Generator`` seeded with ``sampling.seed``; temperature 0 is greedy.

    Args:
        mdp: the MDP whose states index the table.
        logits: ``[n_states, n_replies]`` (nats); default 0 (uniform). Copied.
        name: the backend's name.

    Attributes:
        logits: the table, float64, updated in place by training.
    """

    def __init__(
        self, mdp: TabularDialogueMDP, logits: torch.Tensor | None = None, name: str = "tabular-policy"
    ) -> None:
        self.mdp, self.name = mdp, name
        shape = (mdp.n_states, mdp.n_replies)
        self.logits = (
            torch.zeros(shape, dtype=DTYPE) if logits is None else torch.as_tensor(logits, dtype=DTYPE).clone()
        )
        if tuple(self.logits.shape) != shape:
            raise ValueError(f"logits must have shape [n_states, n_replies] = {shape}, got {tuple(self.logits.shape)}")
        self.tokenizer = TabularTokenizer(mdp)

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        """π as probabilities ``[n_states, n_replies]`` at ``temperature`` (> 0)."""
        return torch.softmax(self.logits / temperature, -1)

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        """One reply per conversation (each ending with a user message of the MDP).

        Raises:
            TabularDialogueError: a conversation is not a state of the MDP.
            ValueError: ``sampling.top_p`` < 1 (the table samples the full softmax).
        """
        if sampling.top_p != 1.0:
            raise ValueError(f"TabularPolicy samples the full softmax; set top_p=1.0 (got {sampling.top_p})")
        if not conversations:
            return []
        states = torch.tensor([self.mdp.state_index(messages) for messages in conversations])
        logits = self.logits[states]  # [B, A]
        if sampling.temperature == 0:
            replies = logits.argmax(-1)
            logprobs = torch.zeros(len(states), dtype=DTYPE)
        else:
            log_probs = torch.log_softmax(logits / sampling.temperature, -1)  # [B, A]
            generator = torch.Generator()
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
            replies = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)  # [B]
            logprobs = log_probs.gather(1, replies[:, None]).squeeze(1)
        completions = []
        for messages, reply, logprob in zip(conversations, replies.tolist(), logprobs.tolist(), strict=True):
            completions.append(
                Completion(
                    text=self.mdp.replies[reply],
                    token_ids=(self.tokenizer.token_id(self.mdp.replies[reply]),),
                    prompt_token_ids=tuple(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)),
                    finish_reason="stop",
                    logprobs=(logprob,),
                )
            )
        return completions


class TabularUser:
    """The simulated user of the tabular MDP, usable as a :class:`~dialogsim.simulator.DialogueSimulator` user.

    The next user message is drawn from ``mdp.user_probs[s_h, a_h]`` (one ``torch.Generator`` per
    dialogue, seeded with its seed). The user is its own backend: :attr:`name` (the tables' fingerprint) enters
    the simulator's config fingerprint, so snapshots do not cross MDPs.

    Attributes:
        backend: ``self``.
        template: a :class:`~dialogsim.user.UserTemplate` named ``"tabular"`` (no prompt is rendered).
        sampling: temperature 1, one token.
        stats: ``parsed`` count (every tabular user turn is parsed).
    """

    def __init__(self, mdp: TabularDialogueMDP) -> None:
        self.mdp = mdp
        self.name = f"tabular-user:{mdp.model_name}"
        self.backend = self
        self.sampling = SamplingParams(temperature=1.0, max_new_tokens=1)
        self.template = UserTemplate.model_free("tabular", self.sampling)
        self.stats: Counter[str] = Counter()

    def next_questions(
        self,
        dialogues: list[list[Message]],
        seed: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        rows: Sequence[PromptRow] | None = None,
    ) -> list[UserTurn]:
        """The next user message of each dialogue (ending with an assistant reply), one generator per dialogue.

        Dialogue i's generator is seeded ``seeds[i]``, else :func:`~dialogsim.sampling.request_seed`
        (``seed``, i), else from fresh entropy (see :meth:`dialogsim.user.UserSimulator.next_questions`).
        ``rows`` (the prompt rows) are not read: the MDP's state is the dialogue.

        Raises:
            TabularDialogueError: a dialogue is not the MDP's, or it is already at the last turn.
            ValueError: both ``seed`` and ``seeds``, or not one seed per dialogue.
        """
        if seed is not None and seeds is not None:
            raise ValueError("next_questions takes seed (one for the call) or seeds (one per dialogue), not both")
        sampling = self.sampling.with_seed(seed) if seeds is None else self.sampling.with_seeds(seeds)
        row_seeds = sampling.conversation_seeds(len(dialogues)) or [None] * len(dialogues)
        draws = []
        for dialogue, row_seed in zip(dialogues, row_seeds, strict=True):
            state = self.mdp.state_index(dialogue[:-1])
            if int(self.mdp.state_turns[state]) >= self.mdp.max_horizon:
                raise TabularDialogueError(f"dialogue is at the last turn {self.mdp.max_horizon}; the user has no move")
            reply = self.mdp.reply_index(dialogue[-1]["content"], where=f"message {len(dialogue) - 1}")
            generator = torch.Generator()
            if row_seed is None:
                generator.seed()
            else:
                generator.manual_seed(row_seed)
            draws.append(int(torch.multinomial(self.mdp.user_probs[state, reply], 1, generator=generator)))
        self.stats["parsed"] += len(draws)
        return [UserTurn(text=self.mdp.user_messages[u], parsed=True) for u in draws]


class TabularReward:
    """The reward model of the tabular MDP: ``mdp.rewards[s_h, a_h]`` of a complete h-turn dialogue.

    A dialogue that is not the MDP's gets NaN, counted under ``failures["not_a_tabular_dialogue"]``.
    """

    def __init__(self, mdp: TabularDialogueMDP) -> None:
        self.mdp = mdp
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per complete dialogue (ending with an assistant reply)."""
        check_batch(dialogues, rows, "TabularReward")
        scores = []
        for dialogue in dialogues:
            try:
                state = self.mdp.state_index(dialogue[:-1])
                if dialogue[-1].get("role") != "assistant":
                    raise TabularDialogueError("the last message must be the assistant reply")
                reply = self.mdp.reply_index(dialogue[-1]["content"])
            except TabularDialogueError:
                self.failures["not_a_tabular_dialogue"] += 1
                scores.append(float("nan"))
                continue
            scores.append(float(self.mdp.rewards[state, reply]))
        return scores


class TabularTokenizer:
    """The minimal tokenizer the simulator and the pair tokeniser need: one token per role and per text.

    ``apply_chat_template`` renders each message as ``[role token, content token]`` (plus the assistant
    role token with ``add_generation_prompt``), which is all ``DialogueSimulator.count_tokens`` and
    ``refuel.pairs.tokenize_pair`` call.
    """

    ROLES: ClassVar[tuple[str, ...]] = ("<|system|>", "<|user|>", "<|assistant|>")

    def __init__(self, mdp: TabularDialogueMDP) -> None:
        texts = [mdp.prompt, *mdp.user_messages, *mdp.replies]
        self.vocab = {token: i for i, token in enumerate(dict.fromkeys([*self.ROLES, *texts]))}
        self.inverse = {i: token for token, i in self.vocab.items()}
        self.name_or_path = f"tabular:{mdp.model_name}"

    def __len__(self) -> int:
        return len(self.vocab)

    def token_id(self, text: str) -> int:
        """The id of a role token or of one message text.

        Raises:
            TabularDialogueError: unknown text.
        """
        if text not in self.vocab:
            raise TabularDialogueError(f"{text!r:.40} is not in the tabular vocabulary {sorted(self.vocab)}")
        return self.vocab[text]

    def apply_chat_template(
        self,
        conversation: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> list[int] | str:
        """Token ids (or, with ``tokenize=False``, the text) of the chat-templated conversation.

        Raises:
            ValueError: ``return_dict=True`` (not supported).
            TabularDialogueError: unknown role or text.
        """
        if return_dict:
            raise ValueError("TabularTokenizer.apply_chat_template supports return_dict=False only")
        ids = []
        for message in conversation:
            ids += [self.token_id(f"<|{message['role']}|>"), self.token_id(message["content"])]
        if add_generation_prompt:
            ids.append(self.vocab["<|assistant|>"])
        return ids if tokenize else " ".join(self.inverse[i] for i in ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """The text of ``token_ids`` (space-joined; role tokens dropped with ``skip_special_tokens``)."""
        tokens = [self.inverse[int(i)] for i in token_ids]
        return " ".join(t for t in tokens if not (skip_special_tokens and t in self.ROLES))


def build_tabular_simulator(
    mdp: TabularDialogueMDP | None = None, horizon: int | None = None, max_dialogue_tokens: int = 2048
) -> DialogueSimulator:
    """A :class:`~dialogsim.simulator.DialogueSimulator` on the tabular MDP.

    Args:
        mdp: default :meth:`TabularDialogueMDP.clarify_first`.
        horizon: fixed H, or ``None`` for H ~ U{1..max_horizon} per episode (the REFUEL public code's
            choice, and what makes last-turn baselines train every turn index).
        max_dialogue_tokens: token budget (each message is 2 tokens, so the default never truncates).
    """
    mdp = mdp if mdp is not None else TabularDialogueMDP.clarify_first()
    row = PromptRow(id=PROMPT_ID, task="Tabular", dataset="tabular", instruction=mdp.prompt)
    config = EpisodeConfig(max_horizon=mdp.max_horizon, horizon=horizon, max_dialogue_tokens=max_dialogue_tokens)
    return DialogueSimulator([row], TabularUser(mdp), TabularReward(mdp), config, TabularTokenizer(mdp))
