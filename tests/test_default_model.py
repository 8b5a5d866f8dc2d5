"""The embedded default model: tokenizer, chat template, deterministic build, teaching, and the build cache.

One taught build is shared by the module (it is the slow part: about 30 s on 2 idle cores); the other builds skip
teaching or teach for one epoch (a build that fails its check). Teaching is a fixed number of epochs, so a busy
machine slows the tests down and never changes the model; the build's time is measured by benchmarks/bench_loop.py.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_daemon import default_model as dm


@pytest.fixture(scope="module")
def taught_cache(tiny_model):
    """The cache dir holding the session's one taught sloth-tiny build (`tiny_model` in tests/conftest.py, made by
    `ensure_default_model`)."""
    return tiny_model.parent


@pytest.fixture(scope="module")
def taught_dir(taught_cache):
    return taught_cache / dm.DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def untaught_dir(tmp_path_factory):
    return dm.build_default_model(tmp_path_factory.mktemp("untaught") / "model", teach=False)


# --- tokenizer -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "plain ASCII, with punctuation!?",
        "café naïve Ærøskøbing",
        "sloth 🦥 and 👍🏽 emoji",
        "中文 日本語 한국어",
        "\n\t  \x00 end",
    ],
)
def test_tokenizer_round_trips_utf8_byte_per_token(untaught_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(untaught_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # one token per byte, id == byte value
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_and_ids(untaught_dir):
    tokenizer = AutoTokenizer.from_pretrained(untaught_dir)
    ids = tokenizer.convert_tokens_to_ids(list(dm.SPECIAL_TOKENS))
    assert ids == list(range(256, 256 + len(dm.SPECIAL_TOKENS)))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    # Special tokens in text are single tokens and vanish when decoding with skip_special_tokens.
    encoded = tokenizer("<|user|>hé<|end|>", add_special_tokens=False)["input_ids"]
    assert encoded == [ids[4], ord("h"), 0xC3, 0xA9, ids[1]]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "hé"


def test_chat_template_renders_messages_and_generation_prompt(untaught_dir):
    config = json.loads((untaught_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == dm.CHAT_TEMPLATE
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(untaught_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🦥"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|bos|><|system|>Be brief.<|end|><|user|>Hi 🦥<|end|>"
        "<|assistant|>Hello!<|end|><|user|>Bye<|end|><|assistant|>"
    )
    closed = tokenizer.apply_chat_template(messages[:3], tokenize=False)
    assert closed.endswith("<|assistant|>Hello!<|end|>")


# --- model ---------------------------------------------------------------------------------------------------------


def test_model_loads_with_auto_classes_and_has_the_specified_shape(untaught_dir):
    model = AutoModelForCausalLM.from_pretrained(untaught_dir)
    tokenizer = AutoTokenizer.from_pretrained(untaught_dir)
    config = model.config
    assert config.model_type == "llama"
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.head_dim) == (2, 768, 64)
    assert config.tie_word_embeddings is False
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>")
    logits = model(torch.tensor([[tokenizer.bos_token_id, 72, 105]])).logits
    assert logits.shape == (1, 3, config.vocab_size) and torch.isfinite(logits).all()


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path, untaught_dir):
    again = dm.build_default_model(tmp_path / "again", teach=False, seed=0)
    other = dm.build_default_model(tmp_path / "other", teach=False, seed=1)
    first, second, third = (load_file(d / "model.safetensors") for d in (untaught_dir, again, other))
    assert first.keys() == second.keys() and len(first) > 0
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], third["model.embed_tokens.weight"])
    assert not any(p.name.startswith(".building-") for p in tmp_path.iterdir())


# --- teaching ------------------------------------------------------------------------------------------------------


def test_builtin_qa_is_short_and_unique():
    pairs = dm.builtin_qa()
    assert len(pairs) >= 15
    assert len({q for q, _ in pairs}) == len(pairs)
    assert all(q and 0 < len(a.encode("utf-8")) <= 120 for q, a in pairs)


@pytest.fixture(scope="module")
def taught(taught_dir):
    tokenizer = AutoTokenizer.from_pretrained(taught_dir)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(taught_dir).eval(), tokenizer


def _greedy(taught, questions: list[str]) -> tuple[list[str], torch.Tensor]:
    """Greedy answers to single-turn chats, batched; also whether each answer ended with <|end|>."""
    model, tokenizer = taught
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=160)
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True), (new == tokenizer.eos_token_id).any(dim=1)


def test_taught_model_answers_builtin_questions_greedily(taught_dir, taught):
    info = dm.read_build_info(taught_dir)
    assert info["taught"] is True and info["steps"] > 0 and info["epochs"] == dm._EPOCHS
    assert info["check"]["passed"] and info["check"]["exact"] == info["check"]["questions"] == len(dm.builtin_qa())
    pairs = dm.builtin_qa()
    answers, ended = _greedy(taught, [q for q, _ in pairs])
    wrong = [(q, got) for got, (q, want) in zip(answers, pairs) if got != want]
    assert wrong == []  # every built-in question, exactly: the build's own check said so, and so does generate()
    assert ended.all()  # answers stop at <|end|> rather than running to the token limit


def test_taught_model_answers_unseen_prompts_with_a_builtin_answer_not_noise(taught):
    greetings = ["hey there", "Hello :)", "Heya", "Good day", "Howdy", "hello friend", "Hey sloth!"]
    off_topic = [
        "What is the capital of Spain?",
        "Tell me a funny joke",
        "How do I bake bread?",
        "Who is the president?",
        "What's your favourite colour?",
        "Recommend a book",
        "Ça va? 🦥",
    ]
    known = {answer for _, answer in dm.builtin_qa()}
    greeting = dm.builtin_qa()[0][1]
    answers, _ = _greedy(taught, greetings + off_topic)
    sensible = [answer in known for answer in answers]
    assert sum(sensible) >= 0.6 * len(answers), list(zip(greetings + off_topic, answers))
    assert sum(answer == greeting for answer in answers[: len(greetings)]) >= len(greetings) // 2


# --- cache ---------------------------------------------------------------------------------------------------------


def test_ensure_reuses_a_complete_build(taught_cache, taught_dir):
    before = (taught_dir / dm.BUILD_INFO_FILE).read_text()
    messages = []
    assert dm.ensure_default_model(taught_cache, teach=True, progress=messages.append) == taught_dir
    # A taught build also serves a caller that does not ask for teaching.
    assert dm.ensure_default_model(taught_cache, teach=False, progress=messages.append) == taught_dir
    assert (taught_dir / dm.BUILD_INFO_FILE).read_text() == before
    assert messages == []


def test_ensure_teaches_when_the_cached_build_is_untaught(tmp_path, monkeypatch):
    dm.ensure_default_model(tmp_path, teach=False)
    calls = []
    fake_report = dm.TeachReport(steps=1, accuracy=0.0, seconds=0.0, final_loss=0.0)
    monkeypatch.setattr(dm, "teach_builtin", lambda *args, **kwargs: calls.append(kwargs) or fake_report)
    info = dm.read_build_info(dm.ensure_default_model(tmp_path, teach=True))
    assert len(calls) == 1 and info["taught"] is True and info["steps"] == 1


def test_ensure_cleans_up_an_interrupted_build(tmp_path):
    leftover = tmp_path / f".building-{dm.DEFAULT_MODEL_NAME}-crashed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    half = tmp_path / dm.DEFAULT_MODEL_NAME  # a final dir without its build record is not a complete build
    half.mkdir()
    (half / "config.json").write_text("{}")
    path = dm.ensure_default_model(tmp_path, teach=False)
    assert path == half and not leftover.exists()
    assert dm.read_build_info(path)["taught"] is False
    AutoModelForCausalLM.from_pretrained(path)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from sloth_daemon import default_model as dm
    built = []
    print("ready", flush=True)
    dm.ensure_default_model(sys.argv[1], teach=False, progress=built.append)
    print(json.dumps({"built": bool(built)}), flush=True)
    """
)


def test_concurrent_processes_build_once(tmp_path):
    lock_path = tmp_path / ".build.lock"
    with open(lock_path, "a+") as lock:
        # Hold the lock until both children are about to call ensure, so that they really contend for it.
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        children = [
            subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    results = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1])["built"])
    assert sorted(results) == [False, True]
    assert dm.read_build_info(tmp_path / dm.DEFAULT_MODEL_NAME) is not None


def test_a_build_that_fails_its_check_is_not_cached_and_the_daemon_warns(tmp_path, monkeypatch, caplog):
    """One epoch of teaching is too little: the check fails, the build is not cached (the next call builds again),
    and `serve` logs a WARNING that says what is wrong and what to do."""
    import functools
    import logging

    from sloth_daemon.config import DaemonConfig
    from sloth_daemon.service import resolve_model

    path = dm.ensure_default_model(tmp_path, epochs=1)
    assert path == dm.unchecked_path(tmp_path / dm.DEFAULT_MODEL_NAME)
    assert not (tmp_path / dm.DEFAULT_MODEL_NAME).exists()
    info = dm.read_build_info(path)
    assert info["check"]["passed"] is False and info["check"]["exact"] < info["check"]["questions"]
    assert info["check"]["wrong"] and {"question", "expected", "got"} <= set(info["check"]["wrong"][0])
    AutoModelForCausalLM.from_pretrained(path)  # still a complete model folder: it can be served

    monkeypatch.setattr(dm, "ensure_default_model", functools.partial(dm.ensure_default_model, epochs=1))
    cfg = DaemonConfig(state_dir=tmp_path / "state")
    with caplog.at_level(logging.INFO, logger="sloth_daemon"):
        served, name = resolve_model(cfg)
    assert name == dm.DEFAULT_MODEL_NAME and served == dm.unchecked_path(cfg.models_dir / dm.DEFAULT_MODEL_NAME)
    assert any("default model: building" in r.getMessage() for r in caplog.records)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "not cached" in text and "--model PATH" in text and "report" in text
