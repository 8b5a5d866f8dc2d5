"""Seeded random request bodies for fuzzing the daemon: from a JSON Schema (the HTTP API's OpenAPI components), then
mutated, plus raw garbage. Used by `tests/test_fuzz.py` for HTTP and ZeroMQ alike.

`SchemaFuzzer(seed, components)`:
- `conforming(schema)`: a value that mostly follows `schema` (`$ref`s into `components`, `anyOf`/`oneOf`, `enum`,
  `const`, object `required`/`properties`, array and string lengths, number ranges), with values drawn towards
  the edges (empty, longest, the bounds, one past them);
- `mutated(value)`: the same with one node replaced by a hostile value (wrong type, a lone surrogate, 2**63,
  1e308, deep nesting, a long string), a required key dropped or an unknown key added;
- `garbage()`: bytes that are not a JSON object (truncated JSON, invalid UTF-8, `NaN`, a bare array, nothing).
Every draw comes from one `random.Random(seed)`: a failing case is reproduced by its seed and index.

Why our own: hypothesis-jsonschema 0.23.1 (the schema-to-strategy library) fails inside the hypothesis release
installed here (`AttributeError: 'many' object has no attribute 'more'`), and schemathesis would add a large
dependency tree for what is a hundred lines over the schema FastAPI already generates.
"""

from __future__ import annotations

import copy
import json
import random
import string
from typing import Any

HOSTILE: list[Any] = [
    None, True, False, 0, -1, 2**31, 2**63, -(2**63) - 1, 2**64, 10**30, 1e308, -1e308, 1e-320, 0.5, -0.0,
    "", " ", "\ud800", "a\udfffb", "\x00", "🦥" * 3, "x" * 5000, "sloth-tiny", "base", "v000001", "up", "down",
    [], [None], [[[[[[[[[[[]]]]]]]]]]], {}, {"": None}, {"role": "user"}, {"content": 1},
]


class SchemaFuzzer:
    def __init__(self, seed: int, components: dict[str, Any]):
        self.rng = random.Random(seed)
        self.components = components

    # -- from the schema ----------------------------------------------------------------------------------------
    def _resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            schema = self.components["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        return schema

    def conforming(self, schema: dict, depth: int = 0) -> Any:
        r = self.rng
        schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return r.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.conforming(r.choice(schema[key]), depth)
        if "allOf" in schema:
            return self.conforming(schema["allOf"][0], depth)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = r.choice(kind)
        if kind is None:
            kind = "object" if "properties" in schema else r.choice(["string", "integer", "object", "null"])
        if depth > 6:  # deep schemas (messages -> tool calls -> ...) end in plain values
            return r.choice(HOSTILE)
        if kind == "object":
            props = schema.get("properties", {})
            required = set(schema.get("required", ()))
            out = {}
            for name, sub in props.items():
                if name in required or r.random() < 0.5:
                    out[name] = self.conforming(sub, depth + 1)
            if not props and r.random() < 0.5:
                out[self._string({"maxLength": 12})] = self.conforming({}, depth + 1)
            return out
        if kind == "array":
            lo = schema.get("minItems", 0)
            hi = min(schema.get("maxItems", lo + 3), lo + 3)
            n = r.choice([lo, hi, r.randint(lo, hi)])
            return [self.conforming(schema.get("items", {}), depth + 1) for _ in range(n)]
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number"):
            return self._number(schema, kind == "integer")
        if kind == "boolean":
            return r.random() < 0.5
        return None

    def _string(self, schema: dict) -> str:
        r = self.rng
        lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 40), 200)
        n = r.choice([lo, hi, r.randint(lo, max(lo, hi))])
        alphabet = r.choice([string.ascii_letters + " ", string.printable, "äöü🦥日本\u200b\n\t"])
        return "".join(r.choice(alphabet) for _ in range(n))

    def _number(self, schema: dict, integer: bool) -> int | float:
        r = self.rng
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -1000))
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 1000))
        edges = [lo, hi, lo - 1, hi + 1, 0, 1]
        value = r.choice(edges) if r.random() < 0.5 else r.uniform(lo, hi)
        return int(value) if integer else float(value)

    # -- hostile changes ------------------------------------------------------------------------------------------
    def mutated(self, value: Any) -> Any:
        r = self.rng
        value = copy.deepcopy(value)
        if not isinstance(value, dict) or not value or r.random() < 0.1:
            return r.choice(HOSTILE)
        paths = list(_paths(value))
        path = r.choice(paths)
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        action = r.random()
        if action < 0.6:
            parent[path[-1]] = r.choice(HOSTILE)
        elif action < 0.8 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[self._string({"minLength": 1, "maxLength": 10})] = r.choice(HOSTILE)
        else:
            parent.append(r.choice(HOSTILE))
        return value

    def garbage(self) -> bytes:
        r = self.rng
        return r.choice([
            b"", b"{", b"}", b"[]", b"null", b"42", b'"x"', b"{'a': 1}", b'{"model": ', b'{"a": NaN}',
            b'{"a": Infinity}', b"\xff\xfe\x00{", b'{"\xc3\x28": 1}', b"{" * 2000, b"[" * 5000 + b"]" * 5000,
            bytes(r.getrandbits(8) for _ in range(r.randint(1, 64))),
        ])


def _paths(value: Any, prefix: tuple = ()) -> Any:
    """Every (key or index) path into `value`'s dicts and lists."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        yield prefix + (key,)
        yield from _paths(sub, prefix + (key,))


def dumps(value: Any) -> bytes:
    """JSON as a client would send it: lone surrogates escaped (`\\ud800`), NaN allowed through."""
    return json.dumps(value).encode()
