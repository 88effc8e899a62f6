"""TransformersBackend and SamplingParams: seeding, prompt ids, padding, stop strings and batching."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.backends.transformers_backend import PerRowSampling, TransformersBackend, chat_prompt_ids
from dialogsim.messages import Message
from dialogsim.sampling import SEED_LIMIT, SamplingParams, request_seed

SHORT: list[Message] = [{"role": "user", "content": "What is 2 + 3?"}]
OTHER_SHORT: list[Message] = [{"role": "user", "content": "Name a colour."}]
LONG: list[Message] = [
    {"role": "user", "content": "Please explain in great detail how photosynthesis works in plants and algae. " * 8}
]
DIALOGUE: list[Message] = [
    {"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in total?"},
    {"role": "assistant", "content": "She sold 48 / 2 = 24 in May, so 48 + 24 = 72 clips."},
    {"role": "user", "content": "Why did you divide by 2?"},
]
CONVERSATIONS: list[list[Message]] = [SHORT, LONG, DIALOGUE]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backend(tiny_model_path: str) -> TransformersBackend:
    """The tiny random model in fp32 (faster than bf16 for a 2-layer model on this CPU)."""
    return TransformersBackend(tiny_model_path, dtype="float32")


@pytest.fixture(scope="module")
def context_sensitive_backend(tiny_model_path: str) -> TransformersBackend:
    """The tiny model with large random weights, so that its greedy output depends on the whole context.

    With the default 0.02-std initialisation the tiny model greedily repeats one token whatever the
    prompt, which would make padding errors invisible.
    """
    backend = TransformersBackend(tiny_model_path, dtype="float32")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in backend.model.named_parameters():
            if "norm" not in name:
                std = 1.0 if "embed" in name else 0.5
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return backend


def _eos(backend: TransformersBackend) -> int:
    return backend.tokenizer.eos_token_id


def test_backend_implements_the_protocol(backend: TransformersBackend) -> None:
    """TransformersBackend is a ChatBackend and returns one Completion per conversation, in order."""
    assert isinstance(backend, ChatBackend)
    completions = backend.chat(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=3, seed=0))
    assert len(completions) == len(CONVERSATIONS)
    assert all(isinstance(completion, Completion) for completion in completions)
    assert backend.chat([], SamplingParams(max_new_tokens=3)) == []


def test_same_seed_gives_identical_completions_and_keeps_global_rng(backend: TransformersBackend) -> None:
    """Two calls with the same seed sample the same replies; the global torch RNG is left untouched."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4, seed=7)
    rng_before = torch.get_rng_state()
    first = backend.chat(CONVERSATIONS, sampling)
    assert torch.equal(torch.get_rng_state(), rng_before)
    second = backend.chat(CONVERSATIONS, sampling)
    assert first == second


def test_different_seeds_give_different_texts(backend: TransformersBackend) -> None:
    """At temperature 1.0 the seed changes the sampled replies (4 tokens out of a 49k vocabulary)."""
    first = backend.chat(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=4, seed=1))
    second = backend.chat(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=4, seed=2))
    assert [c.text for c in first] != [c.text for c in second]
    assert sum(a.token_ids != b.token_ids for a, b in zip(first, second, strict=True)) >= 2


def test_prompt_ids_are_the_chat_template_ids_without_padding(backend: TransformersBackend) -> None:
    """prompt_token_ids are exactly chat_prompt_ids of each conversation, even when left-padded in a batch."""
    completions = backend.chat(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=6, seed=3))
    lengths = {len(c.prompt_token_ids) for c in completions}
    assert len(lengths) == len(CONVERSATIONS), "the batch must mix prompt lengths so that padding happens"
    for conversation, completion in zip(CONVERSATIONS, completions, strict=True):
        assert completion.prompt_token_ids == tuple(chat_prompt_ids(backend.tokenizer, conversation))
        assert backend.tokenizer.decode(completion.prompt_token_ids).endswith("<|im_start|>assistant\n")


def test_generated_ids_have_no_padding_and_decode_to_the_text(backend: TransformersBackend) -> None:
    """token_ids hold no padding (the EOS/pad id only as the final token) and decode to ``text``."""
    max_new_tokens = 6
    completions = backend.chat(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=4))
    eos = _eos(backend)
    assert backend.tokenizer.pad_token_id == eos
    for completion in completions:
        assert 1 <= len(completion.token_ids) <= max_new_tokens
        assert eos not in completion.token_ids[:-1]
        assert backend.tokenizer.decode(completion.token_ids, skip_special_tokens=True) == completion.text
        assert completion.logprobs is None


def test_finish_reason_length_when_the_cap_is_hit(backend: TransformersBackend) -> None:
    """A reply cut by max_new_tokens has exactly max_new_tokens ids, no EOS and finish_reason "length"."""
    max_new_tokens = 5
    completions = backend.chat(CONVERSATIONS, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    eos = _eos(backend)
    for completion in completions:
        if completion.token_ids[-1] == eos:
            assert completion.finish_reason == "stop"
        else:
            assert completion.finish_reason == "length"
            assert len(completion.token_ids) == max_new_tokens
    assert any(completion.finish_reason == "length" for completion in completions)


def test_greedy_ids_do_not_depend_on_left_padding(context_sensitive_backend: TransformersBackend) -> None:
    """Greedy decoding of a short conversation is the same alone and left-padded next to a long one (fp32)."""
    backend = context_sensitive_backend
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    (alone,) = backend.chat([SHORT], greedy)
    (other,) = backend.chat([OTHER_SHORT], greedy)
    assert alone.token_ids != other.token_ids, "the model must be context sensitive for this test to mean anything"
    assert len(set(alone.token_ids)) > 1
    short_first = backend.chat([SHORT, LONG], greedy)
    long_first = backend.chat([LONG, SHORT], greedy)
    assert short_first[0].token_ids == alone.token_ids
    assert long_first[1].token_ids == alone.token_ids
    assert short_first[1].token_ids == long_first[0].token_ids


def test_stop_string_cuts_the_text_right_after_it(backend: TransformersBackend) -> None:
    """A stop string taken from the middle of a free reply cuts that reply right after it; others go on unchanged."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)
    free = backend.chat([SHORT, LONG], sampling)
    text = free[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and stop not in free[1].text
    stopped = backend.chat([SHORT, LONG], replace(sampling, stop=("never-generated-stop", stop)))
    assert stopped[0].text == text[: text.index(stop) + len(stop)]
    assert len(stopped[0].text) < len(text)
    assert stopped[0].finish_reason == "stop"
    assert (stopped[1].text, stopped[1].finish_reason) == (free[1].text, "length")


def test_stop_string_replies_carry_no_padding(backend: TransformersBackend) -> None:
    """A reply ended by a stop string on its first token has that one token id, not a trailing pad/EOS."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)
    free = backend.chat([SHORT, LONG], sampling)
    stop = backend.tokenizer.decode(free[0].token_ids[:1])
    assert stop.strip() and stop not in free[1].text and _eos(backend) not in free[0].token_ids
    stopped = backend.chat([SHORT, LONG], replace(sampling, stop=(stop,)))
    assert stopped[0].text == stop
    assert stopped[0].token_ids == free[0].token_ids[:1]


def test_batch_size_splits_calls_and_keeps_order(
    context_sensitive_backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """batch_size=2 with 5 conversations makes generate calls of 2, 2, 1 and returns 5 completions in order."""
    backend = context_sensitive_backend
    conversations = [SHORT, LONG, DIALOGUE, OTHER_SHORT, [{"role": "user", "content": "Count to three."}]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    alone = [backend.chat([conversation], greedy)[0] for conversation in conversations]
    sizes: list[int] = []
    generate = backend._generate

    def counting_generate(batch: list[list[Message]], sampling: SamplingParams) -> Any:
        sizes.append(len(batch))
        return generate(batch, sampling)

    monkeypatch.setattr(backend, "batch_size", 2)
    monkeypatch.setattr(backend, "_generate", counting_generate)
    completions = backend.chat(conversations, greedy)
    assert sizes == [2, 2, 1]
    assert len(completions) == 5
    for conversation, completion, single in zip(conversations, completions, alone, strict=True):
        assert completion.prompt_token_ids == tuple(chat_prompt_ids(backend.tokenizer, conversation))
        assert completion.token_ids == single.token_ids


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=1.0, max_new_tokens=12),
        SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3, max_new_tokens=12),
    ],
    ids=["temperature", "top_p-and-penalty"],
)
@pytest.mark.parametrize("model", ["default", "context_sensitive"])
def test_per_conversation_seeds_make_a_reply_independent_of_the_batch(
    model: str, sampling: SamplingParams, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversation with seed s gets the same sampled reply alone, twice in a mixed batch of 5, and split (fp32).

    The default tiny model's next-token distribution is near uniform, so its draws are the noise
    itself; the context-sensitive one makes left-padding errors visible.
    """
    backend: TransformersBackend = request.getfixturevalue(
        "backend" if model == "default" else "context_sensitive_backend"
    )
    (alone,) = backend.chat([SHORT], sampling.with_seeds([11]))
    batch = backend.chat([LONG, SHORT, DIALOGUE, SHORT, OTHER_SHORT], sampling.with_seeds([1, 11, 2, 11, 3]))
    assert batch[1] == batch[3] == alone
    monkeypatch.setattr(backend, "batch_size", 2)
    assert backend.chat([LONG, DIALOGUE, OTHER_SHORT, SHORT], sampling.with_seeds([1, 2, 3, 11]))[3] == alone
    # not vacuous: another seed draws another reply, and the draw is not the greedy reply
    assert backend.chat([SHORT], sampling.with_seeds([12]))[0].token_ids != alone.token_ids
    greedy = backend.chat([SHORT], replace(sampling, temperature=0.0))[0]
    assert greedy.token_ids != alone.token_ids and len(set(alone.token_ids)) > 1


def test_call_seed_gives_each_conversation_its_request_seed(backend: TransformersBackend) -> None:
    """A call seed samples conversation i exactly as the per-conversation seed request_seed(seed, i) would."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6)
    by_call_seed = backend.chat(CONVERSATIONS, sampling.with_seed(5))
    by_seeds = backend.chat(CONVERSATIONS, sampling.with_seeds([request_seed(5, i) for i in range(3)]))
    assert by_call_seed == by_seeds
    with pytest.raises(ValueError, match="2 seeds for a call with 3 conversations"):
        backend.chat(CONVERSATIONS, sampling.with_seeds([1, 2]))


def test_per_row_sampling_draws_the_top_p_softmax() -> None:
    """The Gumbel-max draw over 4,000 seeded rows follows softmax(logits / T) cut to the top-p nucleus."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 4_000
    scores = probs.log().expand(rows, -1).clone()  # [rows, 4]
    input_ids = torch.zeros(rows, 1, dtype=torch.long)
    cases = {  # sampling -> expected distribution
        SamplingParams(temperature=1.0, top_p=0.75): torch.tensor([0.625, 0.375, 0.0, 0.0]),  # nucleus {0.5, 0.3}
        SamplingParams(temperature=2.0): probs.sqrt() / probs.sqrt().sum(),
    }
    for sampling, expected in cases.items():
        sampler = PerRowSampling(sampling.with_seeds(range(rows)), [0] * rows, "cpu")
        counts = torch.bincount(sampler(input_ids, scores).argmax(-1), minlength=4).double()  # [4]
        assert torch.allclose(counts / rows, expected.double(), atol=4 * (0.25 / rows) ** 0.5), (sampling, counts)


def test_per_row_repetition_penalty_skips_left_padding() -> None:
    """The penalty applies to each row's own tokens: the pad id in row 0's left padding is not penalised."""
    sampler = PerRowSampling(SamplingParams(temperature=0.0, repetition_penalty=2.0, seeds=(0, 0)), [2, 0], "cpu")
    input_ids = torch.tensor([[0, 0, 3], [0, 1, 3]])  # row 0: two pads (id 0), then token 3
    processed = sampler(input_ids, torch.ones(2, 4))
    assert processed.tolist() == [[1.0, 1.0, 1.0, 0.5], [0.5, 0.5, 1.0, 0.5]]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
    ],
)
def test_sampling_params_validation(kwargs: dict[str, float], field: str) -> None:
    """Invalid sampling settings raise ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_with_seed_copies() -> None:
    """with_seed returns a copy with another seed and leaves the original unchanged; 0 is a valid greedy temperature."""
    base = SamplingParams(temperature=0.0, max_new_tokens=4, stop=("?",))
    seeded = base.with_seed(5)
    assert seeded.seed == 5 and base.seed is None
    assert (seeded.temperature, seeded.max_new_tokens, seeded.stop) == (0.0, 4, ("?",))


def test_sampling_params_per_conversation_seeds() -> None:
    """seeds and seed exclude each other; with_seed/with_seeds clear the other; seeds lie in [0, 2**31)."""
    seeded = SamplingParams(seed=3)
    per_conversation = seeded.with_seeds([4, 5])
    assert (per_conversation.seed, per_conversation.seeds) == (None, (4, 5))
    assert per_conversation.with_seed(6) == SamplingParams(seed=6)
    assert per_conversation.conversation_seeds(2) == [4, 5]
    assert seeded.conversation_seeds(2) == [request_seed(3, 0), request_seed(3, 1)]
    assert SamplingParams().conversation_seeds(2) is None
    with pytest.raises(ValueError, match=r"seed .* or seeds .*not both"):
        SamplingParams(seed=1, seeds=(2,))
    with pytest.raises(ValueError, match=r"seeds\[1\] must be in \[0, 2\*\*31\)"):
        SamplingParams(seeds=(0, SEED_LIMIT))
    with pytest.raises(ValueError, match="3 seeds for a call with 2 conversations"):
        SamplingParams(seeds=(1, 2, 3)).conversation_seeds(2)
