"""TransformersBackend and SamplingParams: seeding, prompt ids, padding, stop strings and batching."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.backends.transformers_backend import TransformersBackend, chat_prompt_ids
from dialogsim.messages import Message
from dialogsim.sampling import SamplingParams

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
    return TransformersBackend(tiny_model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def context_sensitive_backend(tiny_model_path: str) -> TransformersBackend:
    """The tiny model with large random weights, so that its greedy output depends on the whole context.

    With the default 0.02-std initialisation the tiny model greedily repeats one token whatever the
    prompt, which would make padding errors invisible.
    """
    backend = TransformersBackend(tiny_model_path, dtype=torch.float32)
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
