"""Splitting long documents into chunks that fit one training row (`dataio.chunking`, used by teach and import),
with the built-in byte-level tokenizer."""

import pytest

from sloth_daemon.default_model import build_tokenizer
from sloth_daemon.dataio.chunking import split_document


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_short_documents_stay_whole(tok):
    assert split_document(tok, "Sloths sleep a lot.", 64) == ["Sloths sleep a lot."]


def test_chunks_fit_hold_the_whole_text_and_end_at_breaks(tok):
    text = "\n\n".join(f"Paragraph {i}: sloths move slowly and sleep for hours every day." for i in range(20))
    chunks = split_document(tok, text, 127)
    assert "".join(chunks) == text and len(chunks) > 5
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 127 for c in chunks)
    assert all(c.endswith("\n") for c in chunks[:-1])  # a paragraph break lies in every window's second half


def test_text_without_breaks_is_cut_at_the_window(tok):
    text = "z" * 1000
    chunks = split_document(tok, text, 99)
    assert "".join(chunks) == text and [len(c) for c in chunks] == [99] * 10 + [10]
