"""The embedded engine serving from bitsandbytes' 4-bit NF4 base (`embedded.quantization = "nf4"`), on CPU.

The whole engine contract runs on the NF4 base (hot swap with per-request pinning included), and the mixed-batch
path (rows of one batch on different adapter versions) is the one `test_engine_batching` checks on the full-precision
base. Beyond that: the served layers really are NF4, greedy answers equal what the same NF4 model gives through
plain transformers `generate` (with and without an adapter), an adapter the real trainer taught on the NF4 base is
answered exactly, and the whole loop (teach, update on the NF4 base, hot swap) works through a real daemon serving
NF4. Speed and memory are `benchmarks/bench_loop.py`'s (`--configs after,nf4`).
"""

from __future__ import annotations

import pytest
import torch

from sloth_daemon.engine.base import SamplingParams
from sloth_daemon.engine.embedded import EmbeddedEngine
from sloth_daemon.nf4 import keep_plain_layout, nf4_config
from sloth_daemon.prompting import encode, render_prompt

from .daemon_proc import DaemonProcess
from .engine_contract import EngineContract, chat, collect, run
from .taught_adapter import ANSWER, QUESTION, train_taught_adapter
from .test_engine_batching import test_mixed_adapters_in_one_batch_each_give_what_they_give_alone  # noqa: F401
from .test_engine_embedded import make_lora

LONG = SamplingParams(max_tokens=40, temperature=0)
PROMPTS = [QUESTION, "What is sloth-daemon?", "Hello"]


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = EmbeddedEngine(tiny_model, model_name="sloth-tiny", device="cpu", quantization="nf4")
    run(eng.start())
    yield eng
    run(eng.stop())


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters-nf4")
    return [(f"v00000{i}", make_lora(tiny_model, root / f"a{i}", seed=i)) for i in (1, 2)]


@pytest.fixture(scope="module")
def taught_adapter(tmp_path_factory, tiny_model):
    """"You live in Zürich." taught by the real trainer on the NF4 base (the QLoRA the daemon trains on a GPU)."""
    return train_taught_adapter(tiny_model, tmp_path_factory.mktemp("taught-nf4") / "adapter", quantize="nf4")


class TestEmbeddedEngineNF4(EngineContract):
    pass


def test_the_served_layers_are_nf4(engine):
    import bitsandbytes as bnb

    layers = [m for m in engine._model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * engine._model.config.num_hidden_layers  # every projection of every layer
    assert {m.weight.quant_state.quant_type for m in layers} == {"nf4"}
    assert all(m.weight.dtype == torch.uint8 for m in layers)  # packed 4-bit, two weights a byte
    run(collect(engine, chat("Hello")))
    # served without bitsandbytes' CPU bf16 repack (`nf4.keep_plain_layout`), on any CPU
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def _transformers_greedy(model, tokenizer, prompt: str) -> str:
    ids = torch.tensor([encode(tokenizer, render_prompt(tokenizer, "chat", [{"role": "user", "content": prompt}]))])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=LONG.max_tokens,
                             do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_greedy_answers_equal_transformers_generate_on_the_same_nf4_model(engine, tiny_model, taught_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = keep_plain_layout(AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, quantization_config=nf4_config(torch.float32), device_map={"": "cpu"})).eval()
    tokenizer = engine.tokenizer
    base = [_transformers_greedy(reference, tokenizer, p) for p in PROMPTS]
    assert [run(collect(engine, chat(p, LONG)))[0] for p in PROMPTS] == base

    assert run(engine.swap_adapter("v000009", taught_adapter)).applied
    try:
        tuned_ref = PeftModel.from_pretrained(reference, str(taught_adapter)).eval()
        tuned = [_transformers_greedy(tuned_ref, tokenizer, p) for p in PROMPTS]
        served = [run(collect(engine, chat(p, LONG))) for p in PROMPTS]
        assert [text for text, _ in served] == tuned
        assert all(final.adapter_version == "v000009" for _, final in served)
        assert served[0][0] == ANSWER != base[0]  # the fact taught on the NF4 base, answered on it
    finally:
        run(engine.swap_adapter(None, None))
    assert engine.in_flight() == {}


@pytest.mark.slow
def test_the_loop_on_an_nf4_engine_teaches_updates_and_answers(state_dir):
    """A real daemon serving from NF4 trains on the NF4 base too (`train.quantize = "auto"`): teach, update, hot
    swap, the facts answered exactly."""
    env = {"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ZMQ": "off", "SLOTH_EMBEDDED_QUANTIZATION": "nf4"}
    facts = [("What is the name of my cat?", "Your cat is called Biscuit."),
             ("Where did I park the car?", "On level 3, spot 42.")]
    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        with daemon.http() as http:
            model = http.get("/v1/models").json()["data"][0]["id"]

            def greedy(prompt: str) -> str:
                r = http.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                    "max_tokens": 48})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]

            assert [greedy(q) for q, _ in facts] != [a for _, a in facts]
            r = http.post("/sloth/teach", json={"examples": [{"prompt": q, "answer": a} for q, a in facts]})
            assert r.status_code == 200, r.text
            started = http.post("/sloth/updates")
            assert started.status_code == 202, started.text
            update = daemon.wait_update(started.json()["update_id"])
            assert update["status"] == "promoted", (update, daemon.log())
            assert update["metrics"]["train"]["quantized"] is True  # train.quantize auto follows the engine
            assert http.get("/sloth/status").json()["adapter"] == update["adapter_version"]
            assert [greedy(q) for q, _ in facts] == [a for _, a in facts]
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_train_quantize_auto_follows_the_engine(tiny_model):
    from sloth_daemon.config import load_config
    from sloth_daemon.updater import Updater

    def quantize(**env) -> str:
        cfg = load_config(env={"SLOTH_STATE_DIR": "/tmp/sloth-nf4-test", **env})
        return Updater(cfg, store=None, registry=None, engine=None, base_model=tiny_model)._quantize("cpu")

    assert quantize() == "none"
    assert quantize(SLOTH_EMBEDDED_QUANTIZATION="nf4") == "nf4"
    assert quantize(SLOTH_EMBEDDED_QUANTIZATION="nf4", SLOTH_TRAIN_QUANTIZE="none") == "none"  # asked for: kept
    assert quantize(SLOTH_EMBEDDED_QUANTIZATION="nf4", SLOTH_ENGINE="vllm") == "none"  # vLLM serves its own way
