"""The engine contract, as a mixin every engine's test class runs (peft-style shared test suite).

A subclass provides the fixtures `engine` (a started engine serving the base model) and `adapters` (a list of
(version, path) pairs of two different real LoRA adapters for that engine's model). Tests run on the event loop
through `run()` so no async test plugin is needed.
"""

from __future__ import annotations

import asyncio

import pytest

from sloth_daemon.engine.base import (
    Finished,
    GenerationRequest,
    Guide,
    InvalidParam,
    RequestTooLong,
    SamplingParams,
    TextDelta,
)

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


_loop: asyncio.AbstractEventLoop | None = None


def run(coro):
    """Run `coro` on one event loop kept for the whole session: an engine's queues and conditions belong to the loop
    it started on. (The thread's default loop is unusable once any earlier test called `asyncio.run`.)"""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


async def collect(engine, request) -> tuple[str, Finished]:
    text, final = "", None
    async for ev in engine.generate(request):
        if isinstance(ev, TextDelta):
            assert final is None, "text after Finished"
            text += ev.text
        else:
            final = ev
    assert final is not None
    return text, final


def chat(content: str, params: SamplingParams = GREEDY) -> GenerationRequest:
    return GenerationRequest("chat", [{"role": "user", "content": content}], params)


class EngineContract:
    def test_stream_matches_final_text(self, engine):
        text, final = run(collect(engine, chat("Hello")))
        assert text == final.text
        assert final.finish_reason in ("stop", "length")
        assert final.prompt_tokens > 0
        assert 0 < final.completion_tokens <= GREEDY.max_tokens

    def test_completion_kind(self, engine):
        _text, final = run(collect(engine, GenerationRequest("completion", "Once upon a time", GREEDY)))
        assert final.completion_tokens > 0

    def test_greedy_is_deterministic_and_seeded_sampling_repeats(self, engine):
        a = run(collect(engine, chat("What is sloth-daemon?")))[0]
        b = run(collect(engine, chat("What is sloth-daemon?")))[0]
        assert a == b
        sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=123)
        c = run(collect(engine, chat("Hi", sampled)))[0]
        d = run(collect(engine, chat("Hi", sampled)))[0]
        assert c == d

    def test_max_tokens_and_stop(self, engine):
        _t, final = run(collect(engine, GenerationRequest("completion", "abc", SamplingParams(max_tokens=3, temperature=0))))
        assert final.completion_tokens <= 3
        full = run(collect(engine, chat("Hello", SamplingParams(max_tokens=24, temperature=0))))[0]
        if len(full) > 4:
            stop = full[2:4]
            cut = run(collect(engine, chat("Hello", SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))))
            assert cut[0] == full[: full.find(stop)]
            assert cut[1].finish_reason == "stop"

    def test_too_long_is_refused_before_work(self, engine):
        with pytest.raises(RequestTooLong):
            engine.validate(chat("x" * 10, SamplingParams(max_tokens=10**7)))

    def test_concurrent_requests_do_not_interleave(self, engine):
        prompts = [f"Question number {i}?" for i in range(6)]
        solo = [run(collect(engine, chat(p)))[0] for p in prompts]

        async def together():
            return await asyncio.gather(*(collect(engine, chat(p)) for p in prompts))

        assert [t for t, _ in run(together())] == solo

    def test_hot_swap_pins_in_flight_requests(self, engine, adapters):
        (v1, p1), (v2, p2) = adapters
        base = run(collect(engine, chat("Hello")))[0]
        probe = run(engine.swap_adapter(v1, p1))
        assert probe.applied
        assert engine.current_adapter == v1
        long = SamplingParams(max_tokens=40, temperature=0)
        with1 = run(collect(engine, chat("Hello", long)))
        assert with1[1].adapter_version == v1

        async def swap_during_stream():
            stream = engine.generate(chat("Hello", long))
            first = await stream.__anext__()  # the request is in flight on v1
            swap = asyncio.create_task(engine.swap_adapter(v2, p2))
            while engine.current_adapter != v2:  # the flip; the old request is still unread, so still pinned to v1
                assert not swap.done() or swap.exception() is None
                await asyncio.sleep(0.01)
            assert engine.in_flight() == {v1: 1}
            after = await collect(engine, chat("Hello"))  # a new request: must be v2
            rest = [first] + [ev async for ev in stream]
            await swap
            return rest, after

        rest, after = run(swap_during_stream())
        final = rest[-1]
        assert isinstance(final, Finished) and final.adapter_version == v1
        assert final.text == with1[0]  # the whole answer came from v1, though v2 took over mid-stream
        assert after[1].adapter_version == v2
        assert engine.current_adapter == v2
        assert engine.in_flight() == {}
        run(engine.swap_adapter(None, None))
        assert engine.current_adapter is None
        assert run(collect(engine, chat("Hello")))[0] == base

    # -- the OpenAI sampling fields (issue 11) ------------------------------------------------------------------
    def test_n_choices_each_end_and_seeded_choices_repeat(self, engine):
        params = SamplingParams(max_tokens=10, temperature=2.0, n=3, seed=7)

        async def events():
            return [ev async for ev in engine.generate(chat("Tell me a story about a dog", params))]

        evs = run(events())
        finals = {ev.index: ev for ev in evs if isinstance(ev, Finished)}
        assert sorted(finals) == [0, 1, 2] and isinstance(evs[-1], Finished)
        for i, final in finals.items():
            assert "".join(ev.text for ev in evs if isinstance(ev, TextDelta) and ev.index == i) == final.text
            assert 0 < final.completion_tokens <= 10
        assert len({f.text for f in finals.values()}) > 1  # sampled choices differ from each other ...
        again = {ev.index: ev.text for ev in run(events()) if isinstance(ev, Finished)}
        assert again == {i: f.text for i, f in finals.items()}  # ... and a seed repeats all of them

    def test_logit_bias_and_frequency_penalty(self, engine):
        z = engine.tokenizer("Z", add_special_tokens=False)["input_ids"][0]
        forced = run(collect(engine, chat("Hello", SamplingParams(max_tokens=6, temperature=0,
                                                                 logit_bias=((z, 100.0),)))))[0]
        assert forced == "Z" * 6
        biased = SamplingParams(max_tokens=12, temperature=0, logit_bias=((z, 25.0),))
        plain = run(collect(engine, chat("Hello", biased)))[0]
        penalised = run(collect(engine, chat("Hello", SamplingParams(
            max_tokens=12, temperature=0, logit_bias=((z, 25.0),), frequency_penalty=2.0))))[0]
        assert plain.count("Z") > penalised.count("Z")  # each repeat costs 2: the bias stops winning
        with pytest.raises(InvalidParam) as e:
            engine.validate(chat("Hello", SamplingParams(logit_bias=((10**6, 1.0),))))
        assert e.value.param == "logit_bias"

    def test_logprobs_match_the_text_and_greedy_picks_the_top(self, engine):
        params = SamplingParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)

        async def events():
            return [ev async for ev in engine.generate(chat("Hello", params))]

        evs = run(events())
        final = evs[-1]
        assert isinstance(final, Finished) and final.logprobs is not None
        streamed = [lp for ev in evs if isinstance(ev, TextDelta) for lp in ev.logprobs]
        assert [t.token for t in streamed] == [t.token for t in final.logprobs]
        assert len(final.logprobs) == final.completion_tokens
        assert bytes(b for t in final.logprobs for b in t.bytes).decode() == final.text
        for t in final.logprobs:
            assert len(t.top) == 3 and t.logprob <= 0
            assert t.top[0].token == t.token and abs(t.top[0].logprob - t.logprob) < 1e-4  # greedy: the argmax
            assert t.top[0].logprob >= t.top[1].logprob >= t.top[2].logprob
        assert [t.text_offset for t in final.logprobs] == [
            sum(len(x.token) for x in final.logprobs[:i]) for i in range(len(final.logprobs))]

    def test_tiny_temperature_and_top_p_are_greedy_not_a_crash(self, engine):
        greedy = run(collect(engine, chat("Hello", SamplingParams(max_tokens=8, temperature=0))))[0]
        for params in (SamplingParams(max_tokens=8, temperature=1e-45, seed=1),
                       SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-320, seed=2**63 - 1),
                       SamplingParams(max_tokens=8, temperature=0.7, seed=-(2**63))):
            text, final = run(collect(engine, chat("Hello", params)))
            assert final.completion_tokens > 0
            if params.temperature < 1 or params.top_p < 1e-300:
                assert text == greedy or params.temperature == 0.7

    def test_guided_json_follows_the_schema(self, engine):
        import json

        schema = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "windy": {
            "type": "boolean"}}, "required": ["unit", "windy"], "additionalProperties": False}
        for seed in (1, 2):
            params = SamplingParams(max_tokens=48, temperature=1.0, seed=seed, guide=Guide(schema))
            text, final = run(collect(engine, chat("Weather?", params)))
            value = json.loads(text)
            assert value["unit"] in ("celsius", "fahrenheit") and isinstance(value["windy"], bool)
            assert final.finish_reason == "stop"
