"""Sequence packing: rows, position ids and masks, and the loss of a packed batch against the same examples padded
one per row (the standard collation), on sloth-tiny."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_daemon import default_model as dm
from sloth_daemon.prompting import IGNORE_INDEX, encode_example
from sloth_daemon.trainer.packing import assign_rows, pack, token_losses

PAIRS = [
    ("What is the name of my cat?", "Your cat is called Biscuit."),
    ("Where did I park?", "Level 3, spot 42."),
    ("Wifi password?", "sloth-rocks-2026"),
    ("A longer question about something that needs a long and careful answer, please?",
     "Here is the long and careful answer that you asked for, with every detail in it."),
    ("Hi", "Hello!"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = dm.build_default_model(tmp_path_factory.mktemp("pack") / "m", teach=False)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def encoded(tokenizer, with_document=True):
    out = [encode_example(tokenizer, "chat", [{"role": "user", "content": q}], a, 256) for q, a in PAIRS]
    if with_document:  # every token of a document is a label: the one whose first label packing must drop
        out.append(encode_example(tokenizer, "document", None, "Sloths sleep fifteen hours a day.", 256))
    return out


def test_rows_respect_the_budget_and_keep_every_example():
    lengths = [50, 10, 40, 30, 70, 5, 100]
    rows = assign_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 4  # 305 tokens in rows of 100: first-fit decreasing needs 4
    assert assign_rows([300, 20], 100) == [[0], [1]]  # an example longer than the budget gets a row to itself


def test_position_ids_restart_per_example_and_first_labels_are_ignored(tiny):
    _, tokenizer = tiny
    examples = encoded(tokenizer)
    packed = pack(examples, 128, tokenizer.pad_token_id)
    assert packed.input_ids.shape == packed.labels.shape == packed.position_ids.shape
    assert packed.input_ids.shape[0] < len(examples)  # some rows really hold several examples
    for (ids, labels), (row, start, n) in zip(examples, packed.spans):
        assert packed.input_ids[row, start:start + n].tolist() == ids
        assert packed.position_ids[row, start:start + n].tolist() == list(range(n))
        assert packed.labels[row, start].item() == IGNORE_INDEX
        assert packed.labels[row, start + 1:start + n].tolist() == labels[1:]
    covered = torch.zeros_like(packed.input_ids, dtype=torch.bool)
    for row, start, n in packed.spans:
        covered[row, start:start + n] = True
    # Outside the examples: pad tokens, no labels, positions that start a sequence of their own.
    assert (packed.labels[~covered] == IGNORE_INDEX).all()
    assert (packed.input_ids[~covered] == tokenizer.pad_token_id).all()
    assert packed.tokens == sum(len(ids) for ids, _ in examples)


def padded(examples, pad_id):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def test_packed_loss_equals_the_unpacked_loss(tiny):
    model, tokenizer = tiny
    examples = encoded(tokenizer)
    ids, labels, mask = padded(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        unpacked = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        packed_batch = pack(examples, 160, tokenizer.pad_token_id)
        assert packed_batch.input_ids.shape[0] < len(examples)
        packed = model(**packed_batch.model_inputs()).loss
        # Without the per-example positions the examples would attend to each other: the loss would differ.
        leaky = model(input_ids=packed_batch.input_ids, labels=packed_batch.labels).loss
    assert packed.item() == pytest.approx(unpacked.item(), rel=1e-5)
    assert abs(leaky.item() - unpacked.item()) > 1e-3


def test_packed_gradients_equal_the_unpacked_ones(tiny):
    model, tokenizer = tiny
    examples = encoded(tokenizer)
    ids, labels, mask = padded(examples, tokenizer.pad_token_id)
    weight = model.model.layers[0].self_attn.q_proj.weight
    grads = []
    for inputs in ({"input_ids": ids, "attention_mask": mask, "labels": labels},
                   pack(examples, 160, tokenizer.pad_token_id).model_inputs()):
        model.zero_grad()
        model(**inputs).loss.backward()
        grads.append(weight.grad.clone())
    model.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_per_example_losses_match_scoring_one_by_one(tiny):
    model, tokenizer = tiny
    examples = encoded(tokenizer)
    together = token_losses(model, pack(examples, 200, tokenizer.pad_token_id))
    alone = [token_losses(model, pack([ex], 200, tokenizer.pad_token_id))[0] for ex in examples]
    for (s1, n1), (s2, n2), (_, labels) in zip(together, alone, examples):
        assert n1 == n2 == sum(1 for y in labels[1:] if y != IGNORE_INDEX)
        assert s1 == pytest.approx(s2, rel=1e-5)
