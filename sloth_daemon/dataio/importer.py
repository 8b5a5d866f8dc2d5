"""Importing a dataset: rows validated one by one (`formats.parse_row`), documents split to fit
`train.max_seq_len` (`chunking.split_document`), and everything stored in one replay-store transaction.

Contract:
- `ImportRequest` is the body of `POST /sloth/import` (and what `sloth-daemon import FILE` sends, in batches):
  `format` (auto, openai, sharegpt, alpaca, text), `rows` (parsed JSONL objects), `lines` (their line numbers in
  the file; default 1, 2, ...), `documents` (plain-text documents), `skip_invalid`.
- `plan_import(request, tokenizer, max_seq_len)` returns an `ImportPlan`: the examples to store (each validated as
  the store validates: `make_example`) and the `RowError`s. With any error and `skip_invalid` false nothing may be
  stored (the caller raises); with `skip_invalid` the bad rows are reported and the rest stored.
- Chat and completion rows become `teach` examples, documents and `text` rows `document` examples. Duplicates (within the file or
  of stored examples) are stored once: the store deduplicates by content hash.
- `tokenizer` carries the chat template serving and training use (the config's `chat_template`, else the model's
  own: `Operations` passes the engine's). OpenAI rows with `tools` keep them (and an answer's `tool_calls`) when that
  template renders tools (`tool_calls.check_answer_tools`); otherwise, or when a call names a tool the row does not
  offer, the row is an error naming the field. A chat row the template refuses (`prompting.check_example`, as
  teaching checks it) is an error naming `messages`, not a failed update later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from sloth_replay import ToolCallError, make_example

from ..prompting import ChatTemplateError, check_example
from ..tool_calls import check_answer_tools

from .chunking import split_document
from .formats import RowError, parse_row


class ImportRequest(BaseModel):
    format: Literal["auto", "openai", "sharegpt", "alpaca", "completion", "text"] = "auto"
    rows: list[Any] = Field(default_factory=list, description="dataset rows (JSONL objects)")
    lines: list[int] | None = Field(None, description="each row's line number in its file (for error messages)")
    documents: list[str] = Field(default_factory=list, description="plain-text documents")
    skip_invalid: bool = False


@dataclass
class ImportPlan:
    examples: list[tuple] = field(default_factory=list)  # (source, kind, prompt, answer[, {tools, tool_calls}])
    errors: list[RowError] = field(default_factory=list)
    rows: int = 0          # rows and documents read
    chunks: int = 0        # document chunks made (a short document is one chunk)


def plan_import(req: ImportRequest, tokenizer: Any, max_seq_len: int) -> ImportPlan:
    plan = ImportPlan()
    lines = req.lines if req.lines is not None and len(req.lines) == len(req.rows) else range(1, len(req.rows) + 1)
    docs: list[tuple[int, str]] = []
    for line, obj in zip(lines, req.rows):
        plan.rows += 1
        try:
            row = parse_row(obj, req.format, line)
            if row.kind == "document":
                docs.append((line, row.answer))
                continue
            tool_use = {"tools": row.tools, "tool_calls": row.tool_calls}
            if row.tools is not None:
                check_answer_tools(tokenizer, row.tools, row.tool_calls)
            # the store's own validation, and the chat template's (as teaching checks), before storing
            ex = make_example(row.kind, row.prompt, row.answer, "teach", **tool_use)
            check_example(tokenizer, ex.kind, ex.prompt, ex.answer, ex.tools, ex.tool_calls)
            plan.examples.append(("teach", row.kind, row.prompt, row.answer)
                                 + ((tool_use,) if row.tools is not None else ()))
        except RowError as e:
            plan.errors.append(e)
        except ToolCallError as e:
            field_ = "tools" if e.param == "tools" else f"messages.{len(row.prompt)}.{e.param}"
            plan.errors.append(RowError(line, field_, str(e).split(": ", 1)[1]))
        except ChatTemplateError as e:
            plan.errors.append(RowError(line, "messages", f"the chat template refused this row: {e}"))
        except ValueError as e:
            plan.errors.append(RowError(line, None, str(e)))
    for i, text in enumerate(req.documents):
        plan.rows += 1
        if not text.strip():
            plan.errors.append(RowError(i + 1, "documents", "an empty document"))
            continue
        docs.append((i + 1, text))
    for _line, text in docs:
        chunks = split_document(tokenizer, text, max_seq_len - 1)  # the trainer appends the end-of-text token
        plan.chunks += len(chunks)
        plan.examples.extend(("document", "document", None, c) for c in chunks if c.strip())
    return plan
