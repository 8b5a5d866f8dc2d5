"""Per-example scoring: teacher-forced exactness agrees with real greedy generation, and KL to the base is zero for
an untouched adapter and grows when the adapter changes the model."""

import pytest
import torch

from sloth_daemon.default_model import builtin_qa
from sloth_daemon.prompting import render_prompt
from sloth_daemon.trainer.job import LoraSpec, TrainExample, TrainJob
from sloth_daemon.trainer.recipe import attach_lora, collate, load_base
from sloth_daemon.trainer.scoring import score_examples


@pytest.fixture(scope="module")
def peft_model(tiny_model, tmp_path_factory):
    job = TrainJob(base_model=str(tiny_model), output_dir=str(tmp_path_factory.mktemp("o")), batches=[],
                   lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model, tokenizer = load_base(job)
    return attach_lora(model, job), tokenizer


def greedy(model, tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    ids = tokenizer(render_prompt(tokenizer, "chat", messages), add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=120, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def ex(q, a):
    return TrainExample(id=q, kind="chat", prompt=[{"role": "user", "content": q}], answer=a)


def test_exactness_matches_greedy_generation(peft_model):
    model, tokenizer = peft_model
    model.eval()
    questions = [q for q, _ in builtin_qa()[:3]] + ["What is the wifi password?"]
    generated = [greedy(model, tokenizer, q) for q in questions]
    right = [ex(q, g) for q, g in zip(questions, generated)]
    wrong = [ex(q, g[:-1] + ("x" if g[-1:] != "x" else "y")) for q, g in zip(questions, generated)]
    scores = score_examples(model, tokenizer, right + wrong, collate, 256, torch.device("cpu"), batch_size=3)
    assert [s.exact for s in scores] == [True] * 4 + [False] * 4
    assert all(a.loss < b.loss for a, b in zip(scores[:4], scores[4:]))
    assert all(s.tokens > 0 and s.kl is None for s in scores)


def test_kl_to_base_is_zero_until_the_adapter_changes(peft_model):
    model, tokenizer = peft_model
    probes = [ex(q, a) for q, a in builtin_qa()[:4]]
    before = score_examples(model, tokenizer, probes, collate, 256, torch.device("cpu"), kl_to_base=True)
    assert all(abs(s.kl) < 1e-6 for s in before)  # a fresh LoRA (B = 0) is the base model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    after = score_examples(model, tokenizer, probes, collate, 256, torch.device("cpu"), kl_to_base=True)
    assert all(s.kl > 1e-3 for s in after)
    with pytest.raises(ValueError, match="peft model"):
        score_examples(model.get_base_model(), tokenizer, probes, collate, 256, torch.device("cpu"), kl_to_base=True)
