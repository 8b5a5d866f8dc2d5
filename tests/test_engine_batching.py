"""The embedded engine's continuous batching (`sloth_daemon.engine.batching`): concurrent requests decode in one
batch and each still gets exactly what it gets alone, whatever joins, leaves or swaps around it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from sloth_daemon.engine.base import Finished, Guide, SamplingParams, TextDelta
from .engine_contract import chat, collect, run
from .test_engine_embedded import engine  # noqa: F401  (the fixture: a started engine on sloth-tiny, this module's own)
from .taught_adapter import ANSWER, QUESTION

GREEDY = SamplingParams(max_tokens=24, temperature=0)
# prompts of very different lengths (sloth-tiny's tokens are bytes), so rows are left-padded against each other
PROMPTS = ["Hi", "What is sloth-daemon?", QUESTION,
           "Question number 3? " + "Please answer it in a few words, and be precise about it. " * 3,
           "How do I teach it something new, and how long does an update take on a small machine?"]


async def timed(engine, request) -> dict:
    """The request's events, with when its first text and its last choice's end arrived (perf_counter seconds)."""
    evs, first = [], None
    async for ev in engine.generate(request):
        if isinstance(ev, TextDelta) and ev.text and first is None:
            first = time.perf_counter()
        evs.append(ev)
    finals = {ev.index: ev for ev in evs if isinstance(ev, Finished)}
    texts = {i: "".join(ev.text for ev in evs if isinstance(ev, TextDelta) and ev.index == i) for i in finals}
    assert texts == {i: f.text for i, f in finals.items()}  # each choice's deltas make up its text
    return {"first": first, "end": time.perf_counter(), "finals": finals}


def texts(result: dict) -> dict[int, str]:
    return {i: f.text for i, f in result["finals"].items()}


def test_batched_greedy_equals_alone_and_decodes_together(engine):
    alone = [run(collect(engine, chat(p, GREEDY))) for p in PROMPTS]

    async def together():
        return await asyncio.gather(*(timed(engine, chat(p, GREEDY)) for p in PROMPTS))

    batched = run(together())
    for (text, final), got in zip(alone, batched):
        assert texts(got) == {0: text}
        assert got["finals"][0].completion_tokens == final.completion_tokens
        assert got["finals"][0].prompt_tokens == final.prompt_tokens
        assert got["finals"][0].finish_reason == final.finish_reason
    # decoded side by side: every request had its first text before any of them ended (served one at a time, the
    # first would end before the second began)
    assert max(r["first"] for r in batched) < min(r["end"] for r in batched)


def test_every_sampling_feature_inside_a_batch_equals_alone(engine):
    z = engine.tokenizer("Z", add_special_tokens=False)["input_ids"][0]
    full = run(collect(engine, chat("Hello", GREEDY)))[0]
    schema = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
              "additionalProperties": False}
    requests = [
        chat("Hello", SamplingParams(max_tokens=24, temperature=0, stop=(full[3:5],))),  # a stop string
        chat("What is sloth-daemon?", SamplingParams(max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)),
        chat("Tell me a story about a dog", SamplingParams(max_tokens=12, temperature=2.0, n=3, seed=7)),
        chat("Hi", SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=3, presence_penalty=0.5,
                                  frequency_penalty=0.7)),
        chat("Hello", SamplingParams(max_tokens=12, temperature=0, logit_bias=((z, 25.0),), frequency_penalty=2.0)),
        chat("Weather?", SamplingParams(max_tokens=32, temperature=1.0, seed=1, guide=Guide(schema))),
        chat(QUESTION, SamplingParams(max_tokens=3, temperature=0)),  # the length limit
    ]
    alone = [run(timed(engine, r)) for r in requests]

    async def together():
        return await asyncio.gather(*(timed(engine, r) for r in requests))

    batched = run(together())
    for a, b in zip(alone, batched):
        assert texts(b) == texts(a)
        for i, f in a["finals"].items():
            g = b["finals"][i]
            assert (g.finish_reason, g.completion_tokens, g.prompt_tokens) == (
                f.finish_reason, f.completion_tokens, f.prompt_tokens)
            assert (g.logprobs is None) == (f.logprobs is None)
            if f.logprobs:
                assert [t.token for t in g.logprobs] == [t.token for t in f.logprobs]
                assert [t.logprob for t in g.logprobs] == pytest.approx([t.logprob for t in f.logprobs], abs=1e-4)
    stop_cut = batched[0]["finals"][0]
    assert stop_cut.finish_reason == "stop" and stop_cut.text == full[:full.find(full[3:5])]
    assert len(set(texts(batched[2]).values())) > 1  # n sampled choices, decoded side by side, still differ
    assert json.loads(batched[5]["finals"][0].text)["unit"] in ("celsius", "fahrenheit")
    assert batched[6]["finals"][0].finish_reason == "length" and batched[6]["finals"][0].completion_tokens == 3


def test_cancelling_one_request_leaves_the_others_undisturbed(engine):
    z = engine.tokenizer("Z", add_special_tokens=False)["input_ids"][0]
    forced = SamplingParams(max_tokens=300, temperature=0, logit_bias=((z, 100.0),))  # long: never ends early
    natural = SamplingParams(max_tokens=48, temperature=0)
    alone_c = run(collect(engine, chat("What is sloth-daemon?", natural)))[0]
    alone_e = run(collect(engine, chat(PROMPTS[3], natural)))[0]

    async def scenario():
        streams = [engine.generate(chat("Hello", forced)), engine.generate(chat("Hi", forced)),
                   engine.generate(chat("What is sloth-daemon?", natural)), engine.generate(chat("Hey", forced))]
        firsts = [await s.__anext__() for s in streams]  # all four in flight
        deadline = time.monotonic() + 60
        while engine.batch_rows < 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await streams[3].aclose()  # the client of the last one goes away
        while engine.batch_rows != 3:  # its row leaves at the next step; the two 300-token rows are still running
            assert time.monotonic() < deadline, engine.batch_rows
            await asyncio.sleep(0.005)
        assert engine.in_flight() == {None: 3}
        late = asyncio.ensure_future(collect(engine, chat(PROMPTS[3], natural)))  # joins the shrunk batch

        async def rest(first, stream):
            evs = [first] + [ev async for ev in stream]
            return "".join(ev.text for ev in evs if isinstance(ev, TextDelta)), evs[-1]

        done = await asyncio.gather(*(rest(f, s) for f, s in zip(firsts[:3], streams[:3])))
        return done, await late

    done, late = run(scenario())
    for text, final in done[:2]:
        assert text == "Z" * 300 and final.finish_reason == "length"
    assert done[2][0] == alone_c
    assert late[0] == alone_e
    assert engine.in_flight() == {} and engine.batch_rows == 0


def test_mixed_adapters_in_one_batch_each_give_what_they_give_alone(engine, taught_adapter):
    long = SamplingParams(max_tokens=40, temperature=0)
    prompts = [QUESTION, "What is sloth-daemon?"]
    base_alone = [run(collect(engine, chat(p, long)))[0] for p in prompts]
    assert run(engine.swap_adapter("v000001", taught_adapter)).applied
    tuned_alone = [run(collect(engine, chat(p, long)))[0] for p in prompts]
    assert tuned_alone[0] == ANSWER != base_alone[0]  # the adapter really changes the answer

    async def mixed():
        tuned = [asyncio.ensure_future(timed(engine, chat(p, long))) for p in prompts]
        await asyncio.sleep(0)  # the tuned requests are pinned to v000001 and queued ...
        swap = asyncio.ensure_future(engine.swap_adapter(None, None))
        await asyncio.sleep(0)  # ... the flip: requests from now on get the base model ...
        assert engine.current_adapter is None
        base = [asyncio.ensure_future(timed(engine, chat(p, long))) for p in prompts]  # ... and join the same batch
        got = await asyncio.gather(*tuned, *base)
        await swap  # the old version is unloaded once its requests are done
        return got[:2], got[2:]

    tuned, base = run(mixed())
    assert [texts(r)[0] for r in tuned] == tuned_alone
    assert [texts(r)[0] for r in base] == base_alone
    assert all(r["finals"][0].adapter_version == "v000001" for r in tuned)
    assert all(r["finals"][0].adapter_version is None for r in base)
    # the base requests were decoding while the taught answer was still being written: one batch, two adapters
    assert max(r["first"] for r in base) < tuned[0]["end"]
    assert engine.in_flight() == {} and engine.current_adapter is None


def test_a_failing_request_fails_alone(engine, monkeypatch):
    from transformers import LogitsProcessor

    from sloth_daemon.engine.base import EngineError

    class Breaks(LogitsProcessor):  # fault injection: a logits processor that fails at its third token
        calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("processor broke")
            return scores

    prompts = ["What is sloth-daemon?", PROMPTS[3]]
    alone = [run(collect(engine, chat(p, GREEDY)))[0] for p in prompts]
    monkeypatch.setattr(engine._guides, "processor", lambda guide: Breaks())
    guided = chat("Weather?", SamplingParams(max_tokens=24, temperature=0, guide=Guide({"type": "object"})))

    async def together():
        return await asyncio.gather(collect(engine, guided), *(collect(engine, chat(p, GREEDY)) for p in prompts),
                                    return_exceptions=True)

    failed, *others = run(together())
    assert isinstance(failed, EngineError) and "processor broke" in str(failed)
    assert [t for t, _ in others] == alone
    assert engine.in_flight() == {} and engine.batch_rows == 0
    assert run(collect(engine, chat(prompts[0], GREEDY)))[0] == alone[0]  # the engine goes on serving
