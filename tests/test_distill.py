"""Anchors trained by distillation toward the base (`trainer/distill.py`): the KL it trains on is the KL the gate
measures, it is zero for an untouched LoRA, its gradient pulls a drifted LoRA back, and the step inputs keep those
examples apart from the cross-entropy ones, on sloth-tiny (untaught)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_daemon import default_model as dm
from sloth_daemon.trainer.distill import kl_to_base_sum
from sloth_daemon.trainer.job import TrainExample, TrainJob
from sloth_daemon.trainer.recipe import SingleProcess, StepInputs, collate
from sloth_daemon.trainer.scoring import score_examples

PAIRS = [("What is the name of my cat?", "Your cat is called Biscuit."), ("Hi", "Hello! How can I help?"),
         ("Where did I park?", "Level 3, spot 42.")]


def _examples(prefix: str) -> list[TrainExample]:
    return [TrainExample(id=f"{prefix}{i}", kind="chat", prompt=[{"role": "user", "content": q}], answer=a)
            for i, (q, a) in enumerate(PAIRS)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = dm.build_default_model(tmp_path_factory.mktemp("distill") / "m", teach=False)
    return folder, AutoTokenizer.from_pretrained(folder)


def _peft(folder, seed=0):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(folder)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM"))


def _drift(model, scale=0.05):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * scale)


def test_kl_is_zero_for_a_fresh_lora_and_matches_the_gates_measure(tiny):
    folder, tokenizer = tiny
    model = _peft(folder)
    examples = _examples("a")
    batch = collate(tokenizer, examples, 128, torch.device("cpu"))
    kl, n = kl_to_base_sum(model, batch)
    assert n == sum(int((batch["labels"][i, 1:] != -100).sum()) for i in range(len(examples)))
    assert abs(kl.item()) < 1e-6  # LoRA B starts at zero: the model is the base
    _drift(model)
    kl, n = kl_to_base_sum(model, batch)
    scores = score_examples(model, tokenizer, examples, 128, torch.device("cpu"), kl_to_base=True)
    expected = sum(s.kl * s.tokens for s in scores)  # the gate's per-token KL, summed over the same tokens
    assert kl.item() > 1e-3
    assert kl.item() == pytest.approx(expected, rel=1e-4)


def test_a_distillation_step_pulls_a_drifted_lora_toward_the_base(tiny):
    folder, tokenizer = tiny
    model = _peft(folder)
    _drift(model)
    batch = collate(tokenizer, _examples("a"), 128, torch.device("cpu"))
    before = kl_to_base_sum(model, batch)[0].item()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(5):
        kl, n = kl_to_base_sum(model, batch)
        (kl / n).backward()
        opt.step()
        opt.zero_grad()
    assert kl_to_base_sum(model, batch)[0].item() < 0.5 * before


@pytest.mark.parametrize("pack", [True, False])
def test_step_inputs_keep_distilled_examples_apart(tiny, pack):
    folder, tokenizer = tiny
    new, anchors = _examples("n"), _examples("a")
    job = TrainJob(base_model=str(folder), output_dir="x", batches=[[new[0], anchors[0], new[1], anchors[1]]],
                   distill=[a.id for a in anchors], pack=pack, max_seq_len=128)
    (batch, tokens), = list(StepInputs(tokenizer, job, torch.device("cpu")))
    assert "distill" in batch
    plain = collate(tokenizer, new[:2], 128, torch.device("cpu"))
    distilled = collate(tokenizer, anchors[:2], 128, torch.device("cpu"))
    assert tokens == int(plain["attention_mask"].sum() + distilled["attention_mask"].sum())
    assert int((batch["labels"] != -100).sum()) <= int((plain["labels"] != -100).sum())
    assert int((batch["distill"]["labels"] != -100).sum()) == int((distilled["labels"] != -100).sum())
    # Without distillation the same job is one batch of the four examples, as before.
    job.distill = []
    (batch, _), = list(StepInputs(tokenizer, job, torch.device("cpu")))
    assert "distill" not in batch
    # The step's loss: mean over all answer tokens of cross-entropy (plain) and KL to the base (distilled).
    model = _peft(folder)
    _drift(model)
    job.distill = [a.id for a in anchors]
    (batch, tokens), = list(StepInputs(tokenizer, job, torch.device("cpu")))
    with torch.no_grad():
        ce_batch = {k: v for k, v in batch.items() if k != "distill"}
        n_ce = int((ce_batch["labels"][:, 1:] != -100).sum())
        ce = model(**ce_batch).loss.item() * n_ce
        kl, n_kl = kl_to_base_sum(model, batch["distill"])
    loss, _ = SingleProcess(distill_weight=2.0).backward(model, dict(batch), tokens)
    assert loss == pytest.approx((ce + 2.0 * kl.item()) / (n_ce + n_kl), rel=1e-4)
