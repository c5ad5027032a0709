"""Examples and packing: ask's prompt, loss on the answer only, packed pairs isolated from each other."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.train.examples import IGNORE, Example, encode, make_batch, pack, plan_epochs
from pipeline.train.pairs import Pair, answer_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_phi2_dir):
    from pipeline.loading import load_tokenizer

    return load_tokenizer(str(tiny_phi2_dir), "phi-2")


@pytest.fixture(scope="module")
def model(tiny_phi2_dir):
    from transformers import PhiForCausalLM

    return PhiForCausalLM.from_pretrained(tiny_phi2_dir).eval()


def test_an_example_is_asks_prompt_then_the_answer_and_end_of_text_learned_alone(tokenizer, tiny_phi2_dir):
    from pipeline.llm.answerer import Answerer

    eos = tokenizer.eos_token_id
    example = encode(Pair(1, "  What is a bond? ", "A bond pays interest."), tokenizer, eos)
    answerer = Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers")
    prompt = answerer.encode("What is a bond?", 16)  # exactly what `ask` sends phi-2
    assert list(example.ids[:example.prompt_tokens]) == prompt
    answer = answer_ids(tokenizer, "A bond pays interest.")
    assert list(example.ids[example.prompt_tokens:]) == answer + [eos]
    assert tokenizer.decode(answer) == " A bond pays interest."  # as phi-2 writes it after "Output:"
    learned = [(i, t) for i, t in enumerate(example.targets) if t != IGNORE]
    # each learned position predicts the next id: the answer's first id from the prompt's last position
    assert [i for i, _ in learned] == list(range(example.prompt_tokens - 1, len(example) - 1))
    assert [t for _, t in learned] == answer + [eos]


def test_best_fit_packing_keeps_every_example_once_within_capacity():
    generator = random.Random(0)
    lengths = [generator.randint(5, 120) for _ in range(300)]
    rows = pack(lengths, list(range(300)), 128)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= 1.15 * sum(lengths) / 128 + 1  # few half-empty sequences


def test_the_plan_is_the_same_for_the_same_seed_and_shuffled_by_epoch():
    examples = [Example(tuple(range(n)), 2) for n in (10, 20, 30, 40, 50, 60, 70, 15, 25)]
    plan = plan_epochs(examples, epochs=3, capacity=80, rows_per_step=2, seed=5)
    assert plan == plan_epochs(examples, epochs=3, capacity=80, rows_per_step=2, seed=5)
    assert plan != plan_epochs(examples, epochs=3, capacity=80, rows_per_step=2, seed=6)
    assert plan.steps[0] != plan.steps[1]
    assert plan.locate(plan.total - 1)[0] == 2


def test_a_packed_pair_has_the_logits_and_loss_it_has_alone(tokenizer, model):
    eos = tokenizer.eos_token_id
    first = encode(Pair(1, "What is inflation?", "Prices rise over time."), tokenizer, eos)
    second = encode(Pair(2, "What is a bond?", "A bond pays a fixed interest until it matures."), tokenizer, eos)
    packed = make_batch([first, second], [[0, 1]], eos)
    with torch.no_grad():  # no cache, as in training: transformers builds no packed mask beside a cache
        together = model(input_ids=packed.ids, position_ids=packed.positions, use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e.ids]), use_cache=False).logits[0] for e in (first, second)]
        # positions running on across the pair (no packing): the second pair sees the first
        unaware = model(input_ids=packed.ids, position_ids=torch.arange(packed.ids.shape[1])[None],
                        use_cache=False).logits[0]
    n = len(first)
    assert torch.allclose(together[:n], alone[0], atol=1e-5)
    assert torch.allclose(together[n:n + len(second)], alone[1], atol=1e-5)
    assert not torch.allclose(unaware[n:n + len(second)], alone[1], atol=1e-3)  # the test can fail
    targets = packed.targets[0]
    assert targets[n - 1] == IGNORE  # the first pair's end-of-text does not predict the second's prompt
    assert packed.target_tokens == sum(t != IGNORE for t in first.targets + second.targets)


def test_the_trainers_loss_of_a_packed_batch_is_the_sum_of_each_pairs(tokenizer, tiny_phi2_dir):
    from transformers import PhiForCausalLM

    from pipeline.train.options import FineTune
    from pipeline.train.trainer import LoraTrainer

    eos = tokenizer.eos_token_id
    examples = [encode(Pair(i, q, a), tokenizer, eos) for i, (q, a) in
                enumerate([("What is a bond?", "A loan to a company."), ("Why save early?", "Compound interest."),
                           ("What is a stock?", "A share of ownership in a company.")])]
    trainer = LoraTrainer(PhiForCausalLM.from_pretrained(tiny_phi2_dir), FineTune("", "", lora_dropout=0.0), 10,
                          pad_id=eos, gradient_checkpointing=True)
    trainer.model.eval()
    with torch.no_grad():
        packed = trainer.loss_sum(make_batch(examples, [[0, 1], [2]], eos))  # two sequences, one padded
        alone = sum(trainer.loss_sum(make_batch(examples, [[i]], eos)) for i in range(3))
    assert torch.allclose(packed, alone, rtol=1e-5)
