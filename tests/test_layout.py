"""Micro-batches of pairs: both layouts give the same log-probs and gradients, the separate one equals a token-by-token
computation, fixed micro-batches make π_t's log-ratio exactly 0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import chat_prompt_ids, load_tokenizer
from refuel.config import RefuelConfig
from refuel.pairs import ScoredPair
from refuel.training.batching import StepGroupSampler
from refuel.training.layout import collate, pair_length, plan_micro_batches, sequence_logprobs, split_pair
from refuel.training.trainer import RefuelTrainer

TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_path)


def _pairs(tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """Four pairs whose s_h (1 to 3 turns) and replies (1 to 14 tokens) all differ in length."""
    rows = []
    for index in range(4):
        state: list[dict[str, str]] = []
        for turn in range(index % 3 + 1):
            state.append({"role": "user", "content": f"Question {turn} of pair {index}: what is {turn} + {index}?"})
            if turn < index % 3:
                state.append({"role": "assistant", "content": f"It is {turn + index}."})
        prompt = chat_prompt_ids(tokenizer, state)
        replies = [
            f"{index}",
            f"Let me think: {index} plus one more is {index + 1}, so it is {index + 1}." * (index % 2),
        ]
        ids = [[*tokenizer(reply, add_special_tokens=False).input_ids, tokenizer.eos_token_id] for reply in replies]
        rows.append(
            {
                "input_ids": prompt + ids[0],
                "loss_mask": [0] * len(prompt) + [1] * len(ids[0]),
                "input_ids_prime": prompt + ids[1],
                "loss_mask_prime": [0] * len(prompt) + [1] * len(ids[1]),
                "reward": float(index),
                "reward_prime": -0.5 * index,
            }
        )
    return rows


def _load(path: str, attention: str = "sdpa") -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)


def _logprobs(model: PreTrainedModel, rows: list[dict[str, Any]], pad_id: int, layout: str) -> torch.Tensor:
    return sequence_logprobs(model, collate(rows, layout, pad_id), TEMPERATURE)  # [2B]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_logprobs_equal_the_separate_computation(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase, attention: str
) -> None:
    """fp32: every ln π(y|s_h) and ln π(y'|s_h) agrees within 1e-4 nats, with s_h and replies of unequal lengths."""
    model = _load(tiny_model_path, attention).eval()
    rows = _pairs(tokenizer)
    assert len({len(split_pair(row)[0]) for row in rows}) > 1 and len({pair_length(row) for row in rows}) > 1
    with torch.no_grad():
        separate = _logprobs(model, rows, tokenizer.pad_token_id, "separate")
        packed = _logprobs(model, rows, tokenizer.pad_token_id, "shared_prefix")
    assert packed.shape == separate.shape == (8,)
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-4)
    assert len(set(separate.tolist())) == 8  # y and y' are not mixed up


def test_shared_prefix_gradients_equal_the_separate_computation(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The gradient of Σ (ln π(y) − 2 ln π(y')) flows through the single copy of s_h exactly as through two."""
    rows = _pairs(tokenizer)
    weights = torch.tensor([1.0] * 4 + [-2.0] * 4)
    gradients = []
    for layout in ("separate", "shared_prefix"):
        model = _load(tiny_model_path)
        (_logprobs(model, rows, tokenizer.pad_token_id, layout) * weights).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in gradients[0].values())


def test_shared_prefix_layout(tokenizer: PreTrainedTokenizerBase) -> None:
    """[B, P + max(|y| + |y'|)]: s_h left-padded, y then y' then padding, positions restart, y' never sees y."""
    rows = _pairs(tokenizer)
    packed = collate(rows, "shared_prefix", tokenizer.pad_token_id)
    prefix = packed.input_ids.shape[1] - packed.logits_to_keep + 1  # P: logits are kept from P − 1 on
    longest = max(len(split_pair(row)[1]) + len(split_pair(row)[2]) for row in rows)
    assert packed.input_ids.shape == (4, prefix + longest)
    for b, row in enumerate(rows):
        s_h, y, y_prime = split_pair(row)
        second = prefix + len(y)  # y' follows y without padding
        assert packed.input_ids[b, prefix - len(s_h) : prefix].tolist() == s_h
        assert packed.input_ids[b, prefix:second].tolist() == y
        assert packed.input_ids[b, second : second + len(y_prime)].tolist() == y_prime
        assert packed.position_ids[b, second].item() == len(s_h) == packed.position_ids[b, prefix].item()
        mask = packed.attention_mask[b, 0]  # [T, T]
        last_y_prime = second + len(y_prime) - 1
        assert mask[last_y_prime, prefix - len(s_h) : prefix].all()  # y' attends to all of s_h
        assert not mask[last_y_prime, prefix:second].any()  # … and to nothing of y
        start = prefix - len(s_h)
        assert not mask[start:, :start].any()  # real tokens never attend to the left padding
        assert packed.target_mask[b].sum() == len(y) and packed.target_mask[4 + b].sum() == len(y_prime)
        assert packed.targets[4 + b, : len(y_prime)].tolist() == y_prime
        assert packed.predictor[b, 0] == packed.predictor[4 + b, 0] == 0  # P − 1 predicts y_0 and y'_0 alike
    assert packed.reward.tolist() == [0.0, 1.0, 2.0, 3.0, -0.0, -0.5, -1.0, -1.5]
    assert packed.logp_t is None


def test_pairs_that_do_not_share_s_h_are_rejected(tokenizer: PreTrainedTokenizerBase) -> None:
    row = _pairs(tokenizer)[0]
    with pytest.raises(ValueError, match="same s_h"):
        split_pair(row | {"input_ids_prime": [7, *row["input_ids_prime"][1:]]})
    with pytest.raises(ValueError, match="loss_mask"):
        split_pair(row | {"loss_mask": [1] * len(row["loss_mask"])})


def test_collate_refuses_an_unknown_layout_and_no_pairs(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="shared_prefix, separate"):
        collate(_pairs(tokenizer), "packed", tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="at least one pair"):
        collate([], "separate", tokenizer.pad_token_id)


def test_shared_prefix_needs_an_attention_that_takes_a_4d_mask(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flash attention cannot take the block mask: the error names the fix (sdpa, or the separate layout)."""
    model = _load(tiny_model_path)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match="pair_layout separate"):
        _logprobs(model, _pairs(tokenizer), tokenizer.pad_token_id, "shared_prefix")


def _scored(tokenizer: PreTrainedTokenizerBase) -> list[ScoredPair]:
    """The four pairs of :func:`_pairs` with made-up π_t log-probs."""
    return [
        cast(ScoredPair, row | {"logp_t": -10.0 - index, "logp_t_prime": -20.0 - index})
        for index, row in enumerate(_pairs(tokenizer))
    ]


def test_separate_layout(tokenizer: PreTrainedTokenizerBase) -> None:
    """[2B, T]: the B sequences s_h + y, then the B sequences s_h + y', right-padded; the replies are indexed
    from the shortest s_h's last token on; r, r' and π_t's log-probs in the same order."""
    rows = _scored(tokenizer)
    pad = tokenizer.pad_token_id
    batch = collate(rows, "separate", pad)
    sequences = [row["input_ids"] for row in rows] + [row["input_ids_prime"] for row in rows]
    masks = [row["loss_mask"] for row in rows] + [row["loss_mask_prime"] for row in rows]
    length = max(len(s) for s in sequences)
    assert batch.input_ids.shape == batch.attention_mask.shape == (8, length) and batch.position_ids is None
    assert len({len(s) for s in sequences}) > 1  # the test really pads
    first = length - batch.logits_to_keep  # the first position whose logits are kept
    assert first == min(mask.index(1) for mask in masks) - 1
    for index, (sequence, mask) in enumerate(zip(sequences, masks, strict=True)):
        n = len(sequence)
        assert batch.input_ids[index, :n].tolist() == sequence
        assert batch.input_ids[index, n:].eq(pad).all()
        assert batch.attention_mask[index].tolist() == [1] * n + [0] * (length - n)
        reply = [token for token, keep in zip(sequence, mask, strict=True) if keep]
        assert batch.targets[index, : len(reply)].tolist() == reply
        assert batch.target_mask[index].sum() == len(reply)
        predictor = batch.predictor[index, : len(reply)] + first  # positions that predict the reply tokens
        assert predictor.tolist() == list(range(mask.index(1) - 1, n - 1))
    assert batch.reward.tolist() == [0.0, 1.0, 2.0, 3.0, -0.0, -0.5, -1.0, -1.5]
    assert batch.logp_t.tolist() == [-10.0, -11.0, -12.0, -13.0, -20.0, -21.0, -22.0, -23.0]


def _token_by_token(model: PreTrainedModel, ids: list[int], mask: list[int], temperature: float) -> float:
    """Σ over reply positions p of log_softmax(logits[p − 1] / T)[ids[p]], one sequence alone, in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits.double()[0]  # [T, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return sum(logp[position - 1, ids[position]].item() for position in range(1, len(ids)) if mask[position])


@pytest.mark.parametrize("layout", ["separate", "shared_prefix"])
@torch.no_grad()
def test_logprobs_equal_a_token_by_token_computation(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase, layout: str
) -> None:
    """Every reply's ln π(y|s_h) in a padded batch equals log_softmax(logits/T) summed over its tokens alone;
    the temperature divides the logits."""
    model = _load(tiny_model_path).eval()
    rows = _pairs(tokenizer)
    for temperature in (1.0, 0.5):
        batch = collate(rows, layout, tokenizer.pad_token_id)
        values = sequence_logprobs(model, batch, temperature)
        expected = [_token_by_token(model, row["input_ids"], row["loss_mask"], temperature) for row in rows] + [
            _token_by_token(model, row["input_ids_prime"], row["loss_mask_prime"], temperature) for row in rows
        ]
        assert values.tolist() == pytest.approx(expected, rel=1e-6)  # fp32 sums of ~200 nats
        assert all(value < 0 for value in values.tolist())
    hotter = sequence_logprobs(model, batch, 1.0)
    assert (hotter - values).abs().min().item() > 1e-3


@pytest.mark.parametrize("temperature", [0.0, -0.8])
def test_logprobs_refuse_a_non_positive_temperature(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase, temperature: float
) -> None:
    """T ≤ 0 raises ValueError instead of dividing by zero or flipping the distribution."""
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(_load(tiny_model_path), collate(_pairs(tokenizer), "separate", 0), temperature)


def test_micro_batches_form_step_groups_sorted_by_length() -> None:
    """Groups of 4 pairs in micro-batches of 2, longest first; every epoch visits each group once, in a new order."""
    rows = [{"input_ids": [0] * n, "loss_mask_prime": [1] * n} for n in (5, 9, 1, 7, 3, 8, 2, 6, 4, 10)]
    plan = plan_micro_batches(rows, per_device=2, group_size=4, seed=0, by_length=True)
    assert [len(m) for m in plan] == [2, 2, 2, 2, 2]
    lengths = [pair_length(rows[i]) for micro_batch in plan for i in micro_batch]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(i for m in plan for i in m) == list(range(10))
    unsorted = plan_micro_batches(rows, per_device=2, group_size=4, seed=0, by_length=False)
    assert sorted(i for m in unsorted for i in m) == list(range(10)) and unsorted != plan
    sampler = StepGroupSampler(len(plan), per_group=2, seed=0)
    orders = [list(sampler) for _ in range(4)]
    for order in orders:
        assert sorted(order) == list(range(5))
        group_ids = [index // 2 for index in order]  # groups {0, 1}, {2, 3}, {4}
        runs = [g for k, g in enumerate(group_ids) if k == 0 or g != group_ids[k - 1]]
        assert sorted(runs) == [0, 1, 2]  # each group's micro-batches come together
    assert len({tuple(order) for order in orders}) > 1
    with pytest.raises(ValueError, match="multiple"):
        plan_micro_batches(rows, per_device=3, group_size=4, seed=0, by_length=True)


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate fixes the mixed precision per process; start and leave this test with a fresh state."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("layout", ["shared_prefix", "separate"])
def test_bf16_relative_log_ratio_is_exactly_zero_before_the_first_step(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase, tmp_path: Path, layout: str
) -> None:
    """bf16 autocast: π_t's log-probs come from the training micro-batches, so the REFUEL loss at π = π_t is
    exactly η²(r − r')² on both splits, whatever the micro-batch's padding."""
    rows = [dict(row) for row in _pairs(tokenizer) * 2]  # distinct dicts: each split gets its own log-probs
    config = RefuelConfig(
        output_dir=str(tmp_path),
        eta=2.0,
        temperature=TEMPERATURE,
        per_device_batch_size=3,
        gradient_accumulation_steps=1,
        mixed_precision="bf16",
        pair_layout=layout,
    )
    trainer = RefuelTrainer(config, _load(tiny_model_path), tokenizer, rows[:6], rows[6:])
    trainer.compute_logp_t()
    for split, split_rows in (("train", rows[:6]), ("validation", rows[6:])):
        expected = sum((2.0 * (r["reward"] - r["reward_prime"])) ** 2 for r in split_rows) / len(split_rows)
        assert trainer.validate(split).loss == pytest.approx(expected, rel=1e-6)
        assert trainer.validate(split).sign_agreement == 0.0  # every ratio is exactly 0
        assert trainer.metrics_at_pi_t(split).loss == pytest.approx(trainer.validate(split).loss, rel=1e-6)
        assert trainer.metrics_at_pi_t(split).sign_agreement == 0.0


@pytest.mark.parametrize("layout", ["shared_prefix", "separate"])
def test_trainer_logp_t_are_each_pair_alone_as_new_records_in_the_given_order(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase, tmp_path: Path, layout: str
) -> None:
    """compute_logp_t on micro-batches of 3 gives each pair's π_t log-probs as computed alone (fp32, 1e-5), as
    new ScoredPair records in the given order; the given records are left as they were. It runs once."""
    rows = _pairs(tokenizer)
    config = RefuelConfig(
        output_dir=str(tmp_path),
        temperature=TEMPERATURE,
        per_device_batch_size=3,
        gradient_accumulation_steps=1,
        pair_layout=layout,
    )
    model = _load(tiny_model_path)
    trainer = RefuelTrainer(config, model, tokenizer, rows[:3], rows[3:])
    with pytest.raises(RuntimeError, match="compute_logp_t"):
        trainer.metrics_at_pi_t("train")
    scored = trainer.compute_logp_t()
    assert all("logp_t" not in row for row in rows)
    given = {"train": rows[:3], "validation": rows[3:]}
    for split, pairs in (("train", scored.train), ("validation", scored.validation)):
        assert [{k: v for k, v in pair.items() if not k.startswith("logp_t")} for pair in pairs] == given[split]
        for pair in pairs:
            with torch.no_grad():
                alone = _logprobs(model.eval(), [pair], tokenizer.pad_token_id, "separate")  # [2]
            assert [pair["logp_t"], pair["logp_t_prime"]] == pytest.approx(alone.tolist(), abs=1e-5)
    values = [value for pair in scored.train + scored.validation for value in (pair["logp_t"], pair["logp_t_prime"])]
    assert len(set(values)) == 8  # y and y' are not mixed up
    with pytest.raises(RuntimeError, match="once"):
        trainer.compute_logp_t()
