"""Dataset rows in the formats people have, row-by-row validation that names line and field, document chunks that
fit `train.max_seq_len` and join back to the document, and export rows that import back to the same examples."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from sloth_daemon.dataio.chunking import split_document
from sloth_daemon.dataio.exporter import example_row
from sloth_daemon.dataio.formats import RowError, parse_row
from sloth_daemon.dataio.importer import ImportRequest, plan_import
from sloth_replay import make_example

TOOL_ROW = {"messages": [
    {"role": "system", "content": "You can look up the weather."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
    {"role": "assistant", "content": "It is -3 C and snowing in Oslo."},
], "weight": 1}


def test_openai_rows_keep_tool_calls():
    row = parse_row(TOOL_ROW, "auto", 1)
    assert row.kind == "chat" and row.answer == "It is -3 C and snowing in Oslo."
    assert row.prompt[2]["tool_calls"][0]["function"]["name"] == "weather" and row.prompt[2]["content"] == ""
    assert row.prompt[3] == {"role": "tool", "content": "-3 C, snow", "tool_call_id": "call_1"}
    ex = make_example("chat", row.prompt, row.answer, "teach")  # the store keeps them too
    assert ex.prompt == row.prompt


def test_sharegpt_alpaca_completion_and_text_rows():
    sg = parse_row({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                                      {"from": "gpt", "value": "Hello."}]}, "auto", 1)
    assert sg.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert sg.answer == "Hello."
    al = parse_row({"instruction": "Translate to French.", "input": "cat", "output": "chat"}, "auto", 2)
    assert al.prompt == [{"role": "user", "content": "Translate to French.\n\ncat"}] and al.answer == "chat"
    assert parse_row({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", 3).prompt[0]["content"] \
        == "Say hi."
    assert parse_row({"prompt": "2+2=", "completion": "4"}, "auto", 4).kind == "completion"
    assert parse_row({"text": "Some notes."}, "auto", 5).kind == "document"


@pytest.mark.parametrize("row,fmt,field", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "auto", "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}, "auto",
     "messages.1.role"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "auto",
     "messages.0.content"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}], "content": None},
                   {"role": "assistant", "content": "x"}]}, "auto", "messages.0.tool_calls.0.function.name"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}, "auto",
     "conversations.1.from"),
    ({"instruction": "Do it."}, "auto", "output"),
    ({"instruction": "", "output": "x"}, "alpaca", "instruction"),
    ({"text": ""}, "auto", "text"),
    ({"foo": 1}, "auto", None),
    ({"text": "x"}, "openai", "messages"),
])
def test_bad_rows_name_line_and_field(row, fmt, field):
    with pytest.raises(RowError) as e:
        parse_row(row, fmt, 7)
    assert e.value.line == 7 and e.value.field == field
    assert str(e.value).startswith("line 7") and (field is None or field in str(e.value))


def test_long_documents_are_split_to_fit_never_cut(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    doc = "\n\n".join(f"Paragraph {i}. " + "Sloths hang upside down and move slowly. " * (i % 5 + 1)
                      for i in range(60))
    chunks = split_document(tok, doc, 127)
    assert len(chunks) > 5 and "".join(chunks) == doc
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 127 for c in chunks)
    assert all(c[-1].isspace() for c in chunks[:-1])  # cut at breaks (paragraph, sentence, word), never mid-word
    assert sum(c.endswith("\n\n") for c in chunks) >= 20  # paragraph breaks first
    no_breaks = "x" * 1000
    parts = split_document(tok, no_breaks, 100)
    assert "".join(parts) == no_breaks and max(len(p) for p in parts) <= 100
    assert split_document(tok, "short", 100) == ["short"]


def test_an_import_plan_collects_every_error_and_dedups_nothing_itself(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [TOOL_ROW, {"instruction": "x"}, {"text": "y" * 600}, {"messages": "nope"}]
    plan = plan_import(ImportRequest(rows=rows, lines=[1, 2, 3, 5]), tok, max_seq_len=256)
    assert [(e.line, e.field) for e in plan.errors] == [(2, "output"), (5, "messages")]
    assert plan.rows == 4 and plan.chunks == 3 and len(plan.examples) == 4  # one chat row + three chunks


def test_exported_rows_import_back_to_the_same_examples(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    originals = [
        make_example("chat", TOOL_ROW["messages"][:-1], TOOL_ROW["messages"][-1]["content"], "teach"),
        make_example("chat", [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "Hey", "correction"),
        make_example("completion", "The capital of Norway is", " Oslo.", "teach"),
        make_example("document", None, "A short note.", "document"),
    ]
    lines = [json.dumps(example_row(ex)) for ex in originals]
    plan = plan_import(ImportRequest(rows=[json.loads(x) for x in lines]), tok, max_seq_len=512)
    assert not plan.errors
    again = [make_example(kind, prompt, answer, source) for source, kind, prompt, answer in plan.examples]
    assert [e.id for e in again] == [e.id for e in originals]
