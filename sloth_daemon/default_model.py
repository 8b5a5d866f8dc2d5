"""The embedded default model, "sloth-tiny": built locally and deterministically, never downloaded.

Contract:
- `build_default_model(dest)` writes one Hugging Face model folder at `dest`: a byte-level tokenizer
  (`tokenizer.json` + `tokenizer_config.json` with a chat template; loads with `AutoTokenizer`, no remote code),
  a small `LlamaForCausalLM` (safetensors, `config.json`, `generation_config.json`) whose initial weights depend
  only on `seed` (and the torch version), and `sloth_build.json` (how it was built). With `teach=True` the model is
  first trained on the built-in questions and answers about sloth-daemon (`builtin_qa()`, from
  `data/builtin_qa.json`), so its first answers are sensible: paraphrases and fresh random prompts teach it to greet
  any greeting and to answer questions it was never taught with "I don't know that yet. Teach me...". Teaching is a
  fixed number of epochs (never a time limit: the weights depend on the seed and the library versions only), then
  a check: every built-in question must get its exact answer under greedy decoding. A build that fails the check is
  not cached (it is returned from `unchecked_path(dest)`; `check_problem` words the warning).
  The folder appears atomically: built in a temp dir beside `dest`, fsynced, renamed.
- `ensure_default_model(cache_dir)` returns `cache_dir/"sloth-tiny"`, building it only when no complete build is
  there; a file lock makes concurrent callers (threads or processes) build it once, and leftovers of an
  interrupted build are removed.

Tokens: ids 0-255 are the bytes themselves (any UTF-8 text round-trips exactly), then the special tokens
`<|bos|>`, `<|end|>` (eos: ends every message), `<|pad|>`, `<|system|>`, `<|user|>`, `<|assistant|>`.
Chat format: `<|bos|>` then each message as `<|role|>content<|end|>`; the generation prompt is `<|assistant|>`.
Decoding stops at `<|end|>`.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .durable import fsync_dir

DEFAULT_MODEL_NAME = "sloth-tiny"

BOS, END, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, END, PAD, *ROLE_TOKENS)

# The bos token opens a conversation once; every message is framed by its role token and closed by <|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

BUILD_INFO_FILE = "sloth_build.json"
# Recorded in sloth_build.json. A cached build is never rebuilt because this changed: adapters are tied to its weights.
_BUILD_FORMAT = 1
_TEMP_PREFIX = ".building-"
_UNCHECKED_PREFIX = ".unchecked-"
_LOCK_FILE = ".build.lock"

# Architecture (from the design card): small enough to train in seconds on a CPU, head_dim 64 so vLLM supports it.
_HIDDEN, _LAYERS, _HEADS, _KV_HEADS, _INTERMEDIATE = 256, 4, 4, 2, 768
_MAX_POSITIONS = 2048

# Teaching recipe: full-parameter AdamW on answer tokens only, warmup then cosine decay over a planned number of
# epochs. Chosen by a sweep (batch, LR, init std, horizon; several seeds): a randomly initialised sloth-tiny answers
# every built-in question exactly after about 12-19 epochs (about 1.3 s each on 2 idle CPU cores), where the
# transformers default init (std 0.02) needed about 45 epochs. With the schedule planned over a fixed number of
# epochs and no early stop (seed 0, torch 2.13 CPU): 20 epochs gave 21/22 exact, 26 and 32 gave 22/22; 32 leaves a
# margin for other library versions (about 45 s on 2 idle cores; the build time is measured by bench_loop --tiny).
_LR, _WARMUP_STEPS, _BATCH_SIZE, _MIN_LR_FRACTION = 2e-3, 10, 12, 0.1
_EPOCHS = 32
_INIT_STD = 0.1
_LENGTH_JITTER = 16.0  # tokens of random slack when grouping examples of similar length into batches


# ---------------------------------------------------------------------------------------------------------------
# Built-in questions and answers


@functools.cache
def _lesson() -> dict:
    text = resources.files("sloth_daemon").joinpath("data/builtin_qa.json").read_text(encoding="utf-8")
    return json.loads(text)


def builtin_qa() -> list[tuple[str, str]]:
    """The canonical built-in (question, answer) pairs; a taught build answers these exactly under greedy decoding."""
    return [(item["questions"][0], item["answer"]) for item in _lesson()["items"]]


def _teaching_pairs() -> list[tuple[str, str]]:
    """Every written question (canonical and paraphrases) with its answer."""
    return [(question, item["answer"]) for item in _lesson()["items"] for question in item["questions"]]


def _random_pairs(seed: int, epoch: int) -> list[tuple[str, str]]:
    """Fresh prompts for this (seed, epoch), made from the items' `random` sections, each with its item's answer.

    A new set every epoch teaches a rule ("any greeting gets the greeting", "anything not taught gets the
    fallback answer") instead of more prompts to memorise.
    """
    known = {question.casefold() for question, _ in _teaching_pairs()}
    rng = random.Random(seed * 1_000_003 + epoch)
    pairs: list[tuple[str, str]] = []
    for item in _lesson()["items"]:
        spec = item.get("random")
        made = 0
        while spec and made < spec["per_epoch"]:
            words = " ".join(rng.choices(spec["words"], k=rng.randint(1, spec["max_words"])))
            prompt = rng.choice(spec["templates"]).format(words)
            if rng.random() < 0.5:
                prompt = prompt[0].upper() + prompt[1:]
            if prompt.casefold() not in known:
                pairs.append((prompt, item["answer"]))
                made += 1
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and model


def _byte_to_char() -> dict[int, str]:
    """The byte-level alphabet of `tokenizers`' ByteLevel pre-tokenizer: each byte as one printable character.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are shifted to code points
    from 256 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in mapping)
    for n, b in enumerate(shifted):
        mapping[b] = chr(256 + n)
    return mapping


def build_tokenizer():
    """A byte-level `PreTrainedTokenizerFast`: token id == byte value for 0-255, special tokens from 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    byte_to_char = _byte_to_char()
    if set(byte_to_char.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte alphabet does not match the tokenizers library's ByteLevel alphabet")
    # BPE without merges over the 256 byte characters: every byte is exactly one token.
    vocab = {byte_to_char[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=_MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save_tokenizer(tokenizer, folder: Path) -> None:
    # Keep the chat template inside tokenizer_config.json and name classes/keys that transformers 4.x (what a
    # vLLM install may bring) also understands.
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config.pop("extra_special_tokens", None)
    config["additional_special_tokens"] = list(ROLE_TOKENS)
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_config(tokenizer):
    """The `LlamaConfig` of sloth-tiny for `tokenizer` (vocab padded up to a multiple of 64)."""
    from transformers import LlamaConfig

    vocab_size = -(-len(tokenizer) // 64) * 64
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS,
        head_dim=_HIDDEN // _HEADS,
        intermediate_size=_INTERMEDIATE,
        max_position_embeddings=_MAX_POSITIONS,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=_INIT_STD,
        torch_dtype="float32",
    )


def _init_model(config, seed: int):
    from transformers import LlamaForCausalLM

    # A private RNG scope: the weights depend on `seed` only, and the caller's global RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )


# ---------------------------------------------------------------------------------------------------------------
# Teaching


@dataclass
class TeachReport:
    steps: int
    accuracy: float  # fraction of canonical built-in questions answered exactly (greedy)
    seconds: float
    final_loss: float
    wrong: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, greedy answer)


def _encode_pair(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of one user/assistant exchange and its labels (-100 everywhere except the answer and its <|end|>)."""
    prompt = _chat_ids(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    full = _chat_ids(
        tokenizer,
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        add_generation_prompt=False,
    )
    if full[: len(prompt)] != prompt:
        raise RuntimeError("chat template: the generation prompt is not a prefix of the full exchange")
    return full, [-100] * len(prompt) + full[len(prompt) :]


def _chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def _step_outputs(model, batch):
    """Mean answer-token loss and, per row, whether greedy decoding would reproduce the labels exactly.

    Teacher forcing is equivalent to greedy decoding here: if the argmax at every answer position is the next
    label token, greedy decoding from the prompt produces exactly the answer and then <|end|>.
    """
    device = next(model.parameters()).device
    input_ids, labels, mask = (tensor.to(device) for tensor in batch)
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    scored = targets != -100
    exact = ((logits.argmax(-1) == targets) | ~scored).all(dim=1)
    return loss, exact


def _lr_schedule(planned_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to a floor at `planned_steps` (exact recall needs a low final LR)."""

    def factor(step: int) -> float:
        if step < _WARMUP_STEPS:
            return (step + 1) / _WARMUP_STEPS
        progress = min(1.0, (step - _WARMUP_STEPS) / max(1, planned_steps - _WARMUP_STEPS))
        return _MIN_LR_FRACTION + (1 - _MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _epoch_batches(examples: list, generator: torch.Generator) -> list[list[int]]:
    """Batches of similar length (little padding) whose membership and order still vary from epoch to epoch."""
    jitter = (torch.rand(len(examples), generator=generator) * _LENGTH_JITTER).tolist()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + jitter[i])
    batches = [order[first : first + _BATCH_SIZE] for first in range(0, len(order), _BATCH_SIZE)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def teach_model(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    check: list[tuple[str, str]] | None = None,
    extra: Callable[[int], list[tuple[str, str]]] | None = None,
    seed: int = 0,
    epochs: int = _EPOCHS,
    progress: Callable[[str], None] | None = None,
) -> TeachReport:
    """Train every parameter of `model` for exactly `epochs` passes over `pairs` (plus `extra(epoch)`, fresh pairs
    for each epoch), the learning rate decaying to its floor at the last step; then check with greedy decoding
    (`greedy_check`) which pairs of `check` (default: `pairs`) the model answers exactly.

    A fixed amount of teaching, never a time limit: the result depends on the seed and the library versions only.
    """
    check = pairs if check is None else check
    say = progress or (lambda _msg: None)
    start = time.monotonic()
    fixed = [_encode_pair(tokenizer, q, a) for q, a in pairs]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = None
    model.train()
    steps, loss_value = 0, float("nan")
    for epoch in range(epochs):
        examples = fixed + [_encode_pair(tokenizer, q, a) for q, a in (extra(epoch) if extra else [])]
        batches = _epoch_batches(examples, generator)
        if schedule is None:
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_schedule(epochs * len(batches)))
        for rows in batches:
            loss, _ = _step_outputs(model, _collate([examples[i] for i in rows], tokenizer.pad_token_id))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            steps += 1
            loss_value = loss.item()
        say(f"teach: epoch {epoch + 1}/{epochs}, step {steps}, loss {loss_value:.3f}, "
            f"{time.monotonic() - start:.1f}s")
    model.eval()
    wrong = greedy_check(model, tokenizer, check)
    accuracy = 1 - len(wrong) / max(1, len(check))
    say(f"teach: {len(check) - len(wrong)}/{len(check)} built-in questions answered exactly (greedy)")
    return TeachReport(steps=steps, accuracy=accuracy, seconds=time.monotonic() - start, final_loss=loss_value,
                       wrong=wrong)


@torch.no_grad()
def greedy_check(model, tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Greedy-decode an answer to each question (single-turn chat, transformers' `generate`, batched, left padding)
    and return the (question, expected, got) of every answer that is not exactly the expected one."""
    prompts = [_chat_ids(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q, _ in pairs]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pairs)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=longest + 2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    answers = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    ended = (out[:, width:] == tokenizer.eos_token_id).any(dim=1).tolist()
    return [(q, a, got) for (q, a), got, end in zip(pairs, answers, ended) if got != a or not end]


def teach_builtin(
    model, tokenizer, *, seed: int = 0, epochs: int = _EPOCHS, progress: Callable[[str], None] | None = None
) -> TeachReport:
    """Teach `model` the built-in lesson: every written question, plus fresh random prompts each epoch."""
    return teach_model(
        model,
        tokenizer,
        _teaching_pairs(),
        check=builtin_qa(),
        extra=lambda epoch: _random_pairs(seed, epoch),
        seed=seed,
        epochs=epochs,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------------------------
# Building and caching


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _publish_tree(folder: Path) -> None:
    """Make `folder` world-readable (mkdtemp creates it private) and flush every file and the folder to disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            path.chmod(0o644)
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    folder.chmod(0o755)
    fsync_dir(folder)


def build_default_model(
    dest: Path,
    *,
    teach: bool = True,
    seed: int = 0,
    epochs: int = _EPOCHS,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build sloth-tiny into `dest` (replacing what is there) and return where it ended up.

    The folder is assembled in a temp dir beside `dest`, fsynced and renamed into place, so `dest` is either
    absent or complete. A taught build that fails its check (a built-in question not answered exactly under greedy
    decoding) does not replace `dest`: it is renamed to `unchecked_path(dest)` instead, and that path is returned.
    `sloth_build.json` records the outcome (`check`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{dest.name}-", dir=dest.parent))
    try:
        tokenizer = build_tokenizer()
        config = build_config(tokenizer)
        model = _init_model(config, seed)
        model.generation_config = _generation_config(tokenizer)
        say(f"building {DEFAULT_MODEL_NAME} (seed {seed}) into {dest}")
        report = None
        if teach:
            say(f"teaching {DEFAULT_MODEL_NAME} the built-in questions ({epochs} epochs)")
            report = teach_builtin(model, tokenizer, seed=seed, epochs=epochs, progress=say)
        model.save_pretrained(temp)
        _save_tokenizer(tokenizer, temp)
        info = {
            "name": DEFAULT_MODEL_NAME,
            "format": _BUILD_FORMAT,
            "seed": seed,
            "taught": teach,
            "steps": report.steps if report else 0,
            "accuracy": report.accuracy if report else None,
            "final_loss": report.final_loss if report else None,
            "epochs": epochs if report else 0,
            "check": None if report is None else {
                "passed": not report.wrong, "exact": len(builtin_qa()) - len(report.wrong),
                "questions": len(builtin_qa()),
                "wrong": [{"question": q, "expected": a, "got": got} for q, a, got in report.wrong[:5]],
            },
            "teach_seconds": round(report.seconds, 2) if report else 0.0,
            "seconds": round(time.monotonic() - started, 2),
            "questions": len(builtin_qa()),
            "weights_sha256": _file_sha256(temp / "model.safetensors"),
            "built_at": time.time(),
            "versions": _versions(),
        }
        (temp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _publish_tree(temp)
        if report is not None and report.wrong:
            # Not cached: the next start builds again. Served from here meanwhile (the caller warns).
            unchecked = unchecked_path(dest)
            shutil.rmtree(unchecked, ignore_errors=True)
            os.rename(temp, unchecked)
            fsync_dir(dest.parent)
            say(f"built {DEFAULT_MODEL_NAME} in {info['seconds']:.1f}s but it failed its check "
                f"({info['check']['exact']}/{info['check']['questions']} exact); not cached")
            return unchecked
        # Replace an older build by two renames; a crash in between leaves only names that cleanup recognises.
        replaced = None
        if dest.exists():
            replaced = dest.with_name(f"{temp.name}-replaced")
            os.rename(dest, replaced)
        os.rename(temp, dest)
        fsync_dir(dest.parent)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if report:
        say(f"built {DEFAULT_MODEL_NAME} in {info['seconds']:.1f}s: {report.steps} steps, exact {report.accuracy:.0%}")
    return dest


def unchecked_path(dest: Path) -> Path:
    """Where a build that failed its check is put instead of `dest` (removed by the next `ensure_default_model`)."""
    return Path(dest).with_name(f"{_UNCHECKED_PREFIX}{Path(dest).name}")


def check_problem(info: dict | None) -> str | None:
    """A sentence for the log when a build record says the build failed its check, else None."""
    check = (info or {}).get("check")
    if not check or check.get("passed", True):
        return None
    examples = "; ".join(f"{w['question']!r} -> {w['got']!r}" for w in check.get("wrong", [])[:2])
    return (f"the built-in model {DEFAULT_MODEL_NAME} answers only {check['exact']} of its {check['questions']} "
            f"built-in questions exactly ({examples}). It is served anyway but not cached, and is built again at the "
            f"next start. Its build is deterministic, so this is a bug for these library versions "
            f"({', '.join(f'{k} {v}' for k, v in (info or {}).get('versions', {}).items())}): please report it; "
            f"meanwhile serve a real model with --model PATH")


def read_build_info(folder: Path) -> dict | None:
    """The build record of a complete sloth-tiny folder, or None if `folder` is not one."""
    folder = Path(folder)
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not all((folder / name).is_file() for name in required):
        return None
    try:
        return json.loads((folder / BUILD_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_default_model(
    cache_dir: Path,
    *,
    teach: bool = True,
    progress: Callable[[str], None] | None = None,
    epochs: int = _EPOCHS,
) -> Path:
    """Return `cache_dir/"sloth-tiny"`, building it first unless a complete build is there (a taught one if `teach`).
    A fresh build that fails its check is returned from `unchecked_path` instead and not cached (see
    `build_default_model`; `check_problem` says what to tell the user).

    Callers in other processes or threads serialise on `cache_dir/.build.lock`, so the model is built once.
    A complete build is never rebuilt for another reason: its weights are the base that adapters were trained on.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / DEFAULT_MODEL_NAME
    with open(cache_dir / _LOCK_FILE, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            info = read_build_info(dest)
            if info is not None and (info.get("taught") or not teach):
                return dest
            # Holding the lock, any temp dir here is a leftover of an interrupted build.
            for leftover in cache_dir.glob(f"{_TEMP_PREFIX}{DEFAULT_MODEL_NAME}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            shutil.rmtree(unchecked_path(dest), ignore_errors=True)
            return build_default_model(dest, teach=teach, epochs=epochs, progress=progress)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
