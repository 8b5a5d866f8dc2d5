"""The ZeroMQ wire protocol, version 1: what the server (`api/zmq.py`) and the client (`sloth_daemon.client`) share.

A request is one ZeroMQ message: `[payload]` from a DEALER, or `[b"", payload]` from a REQ (or a DEALER that sends
the empty delimiter); the server's ROUTER adds the peer's identity in front and answers the same way. The payload is
a JSON object, or a msgpack map (told apart by the first byte: a msgpack map starts with 0x80-0x8f, 0xde or 0xdf, a
JSON object with `{` or whitespace); replies use the request's encoding. docs/zmq-protocol.md is the full reference.

Kept here, importable without pulling in the daemon: the version, the op names, the payload codec and the rule that
turns the `zmq` setting into addresses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Mapping

import msgpack

from ..textcheck import invalid_text

VERSION = 1
GENERATION_OPS = ("chat", "complete")
OPS = GENERATION_OPS + ("feedback", "teach", "import", "status", "trigger_update", "models", "updates", "adapters",
                        "rollback", "interactions", "set_aside", "requeue", "forget", "remove_adapter", "cancel")
# Safe to send again after a timeout: reading them twice changes nothing.
IDEMPOTENT_OPS = frozenset({"status", "models", "updates", "adapters", "interactions", "set_aside"})
# Envelope keys of a request; every other key is an op field.
ENVELOPE_KEYS = frozenset({"v", "id", "op", "key"})
MAX_ID_LENGTH = 128
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
SOCKET_NAME = "api.sock"
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL on Linux.
MAX_IPC_PATH_BYTES = 107

Encoding = Literal["json", "msgpack"]


class ProtocolError(ValueError):
    """A payload that is not a well-formed request."""


def encode(obj: Any, encoding: Encoding = "json") -> bytes:
    if encoding == "msgpack":
        return msgpack.packb(obj, default=str, use_bin_type=True)
    return json.dumps(obj, default=str, separators=(",", ":"), ensure_ascii=False).encode()


def decode(data: bytes) -> tuple[Any, Encoding]:
    """The payload's object and its encoding; `ProtocolError` for anything that does not decode."""
    if not data:
        raise ProtocolError("empty payload")
    first = data[0]
    encoding: Encoding = "msgpack" if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF) else "json"
    try:
        if encoding == "msgpack":
            return msgpack.unpackb(data, raw=False), encoding
        return json.loads(data), encoding
    except Exception as e:  # malformed input can fail in many ways (decode, recursion depth, extra data)
        raise ProtocolError(f"payload is not valid {encoding}: {e.__class__.__name__}") from None


def valid_id(rid: Any) -> bool:
    """A request id is a non-empty string of valid Unicode (at most 128 characters) or an integer."""
    if isinstance(rid, bool):
        return False
    if isinstance(rid, int):
        return True
    return isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LENGTH and invalid_text(rid) is None


def resolve_addresses(setting: str, state_dir: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """The addresses the daemon binds for the `zmq` setting: `off` = none; `auto` = `ipc://$RUNTIME_DIRECTORY/
    api.sock` under systemd (which sets RUNTIME_DIRECTORY), else `ipc://<state_dir>/api.sock`; otherwise the
    comma-separated addresses as given."""
    env = os.environ if env is None else env
    setting = setting.strip()
    if setting == "off":
        return []
    if setting == "auto":
        runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
        base = Path(runtime) if runtime else Path(state_dir)
        return [f"ipc://{base.resolve() / SOCKET_NAME}"]
    return [a.strip() for a in setting.split(",") if a.strip()]


def check_address(address: str) -> None:
    """Raise ValueError unless `address` is an `ipc://PATH` or `tcp://HOST:PORT` address."""
    if address.startswith("ipc://"):
        if len(address) == len("ipc://"):
            raise ValueError(f"{address!r}: ipc:// needs a path")
        return
    if address.startswith("tcp://"):
        host, sep, port = address[len("tcp://"):].rpartition(":")
        if not sep or not host or not (port == "*" or port.isdigit()):
            raise ValueError(f"{address!r}: expected tcp://HOST:PORT")
        return
    raise ValueError(f"{address!r}: expected ipc://PATH or tcp://HOST:PORT")
