"""Finding text that is not valid Unicode in request data, so it is refused at the edge with the field's name.

JSON may carry a lone UTF-16 surrogate escape (`"\\ud800"`); Python's `json` (and msgpack) decode it into a `str`
that no UTF-8 encoder accepts, so it would fail much later and far from its cause: in the tokenizer, in the replay
store's write, in a ZeroMQ reply. Every front end checks its requests with `invalid_text` before any work.

Contract: `invalid_text(obj)` walks dicts (keys and values), lists/tuples, pydantic models and strings and returns
`(path, message)` for the first string that cannot be encoded as UTF-8, or None. `path` is dotted like the API's
`param` (`messages.0.content`; a bad dict key is named by its parent's path). Cost: one C-level scan per string.
Importable without the daemon's heavy dependencies (the client uses it).
"""

from __future__ import annotations

from typing import Any


def _bad_position(s: str) -> int | None:
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _describe(s: str, at: int) -> str:
    return (f"contains a lone surrogate (\\u{ord(s[at]):04x} at character {at}), which is not valid Unicode text; "
            "send text as UTF-8")


def invalid_text(obj: Any, path: str = "") -> tuple[str, str] | None:
    """`(dotted path, message)` of the first string in `obj` that is not valid Unicode text, else None."""
    if isinstance(obj, str):
        at = _bad_position(obj)
        return None if at is None else (path, _describe(obj, at))
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and (at := _bad_position(key)) is not None:
                return (path, f"a field name {_describe(key, at)}")
            if (found := invalid_text(value, sub)) is not None:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            if (found := invalid_text(value, f"{path}.{i}" if path else str(i))) is not None:
                return found
        return None
    if hasattr(obj, "model_dump") and hasattr(type(obj), "model_fields"):  # a pydantic model: its fields' values
        return invalid_text({name: getattr(obj, name) for name in type(obj).model_fields}, path)
    return None
