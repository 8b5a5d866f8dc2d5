"""Per-example scoring: teacher-forced exactness agrees with real greedy generation, KL to the base is zero for
an untouched adapter and grows when the adapter changes the model, and scoring batches of several examples gives
each example what scoring it alone in a batch of its own gives."""

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
    scores = score_examples(model, tokenizer, right + wrong, 256, torch.device("cpu"), batch_tokens=1)
    assert [s.exact for s in scores] == [True] * 4 + [False] * 4
    assert all(a.loss < b.loss for a, b in zip(scores[:4], scores[4:]))
    assert all(s.tokens > 0 and s.kl is None for s in scores)


def test_kl_to_base_is_zero_until_the_adapter_changes(peft_model):
    model, tokenizer = peft_model
    probes = [ex(q, a) for q, a in builtin_qa()[:4]]
    before = score_examples(model, tokenizer, probes, 256, torch.device("cpu"), kl_to_base=True)
    assert all(abs(s.kl) < 1e-6 for s in before)  # a fresh LoRA (B = 0) is the base model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    after = score_examples(model, tokenizer, probes, 256, torch.device("cpu"), kl_to_base=True)
    assert all(s.kl > 1e-3 for s in after)
    with pytest.raises(ValueError, match="peft model"):
        score_examples(model.get_base_model(), tokenizer, probes, 256, torch.device("cpu"), kl_to_base=True)


def alone(model, tokenizer, example, kl: bool) -> tuple[float, bool, int, float | None]:
    """One example scored in a batch of its own, the plain way (the reference for the batched scoring)."""
    batch = collate(tokenizer, [example], 256, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1].float()
        labels = batch["labels"][0, 1:]
        sel = labels != -100
        logp = torch.log_softmax(logits[sel], -1)
        nll = -logp.gather(-1, labels[sel].unsqueeze(-1)).sum().item()
        n = int(sel.sum())
        exact = bool((logits[sel].argmax(-1) == labels[sel]).all())
        kl_mean = None
        if kl:
            with model.disable_adapter():
                base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1]
            base_logp = torch.log_softmax(base[sel].float(), -1)
            kl_mean = (base_logp.exp() * (base_logp - logp)).sum().item() / n
    return nll / n, exact, n, kl_mean


def test_batched_scores_equal_each_example_scored_alone(peft_model):
    model, tokenizer = peft_model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # an adapter that changes the model a little: KL > 0, some answers still exact
    model.eval()
    pairs = builtin_qa()[:10]
    examples = [ex(q, a) for q, a in pairs] + [ex(pairs[0][0], pairs[0][1] + " Really.")]  # one not exact
    examples.append(TrainExample(id="doc", kind="document", answer="Sloths hang upside down for hours. " * 4))
    for budget in (1, 300, 4096):  # tokens per forward: an example's figures do not depend on what shares it
        batched = score_examples(model, tokenizer, examples, 256, torch.device("cpu"), kl_to_base=True,
                                batch_tokens=budget)
        for e, got in zip(examples, batched):
            loss, exact, n, kl = alone(model, tokenizer, e, kl=True)
            assert got.tokens == n and got.exact == exact
            assert got.loss == pytest.approx(loss, rel=1e-4, abs=1e-6)
            assert got.kl == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert any(s.exact for s in batched) and not all(s.exact for s in batched)
    assert score_examples(model, tokenizer, [], 256, torch.device("cpu")) == []


def test_length_batches_keep_the_token_budget():
    from sloth_daemon.trainer.scoring import length_batches

    lengths = [30, 100, 90, 10, 500, 95, 20]
    batches = length_batches(lengths, 300)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [4]  # longer than the budget: alone
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        assert len(b) == 1 or len(b) * lengths[b[0]] <= 300
    assert length_batches([], 300) == []
