"""sloth_replay: the replay store (SQLite) and example selection/mixing for continual updates."""

from .examples import Example, ToolCallError, canonical_json, content_hash, make_example
from .mixing import MixRatios, batch_counts, build_batches, split_holdout
from .schema import SCHEMA_VERSION, SchemaError
from .store import (
    InvalidInput,
    NotFound,
    ReadOnlyStore,
    ReplayStore,
    StoreError,
    UpdateAlreadyRunning,
)

__all__ = [
    "SCHEMA_VERSION",
    "Example",
    "InvalidInput",
    "MixRatios",
    "NotFound",
    "ReadOnlyStore",
    "ReplayStore",
    "SchemaError",
    "StoreError",
    "UpdateAlreadyRunning",
    "batch_counts",
    "build_batches",
    "canonical_json",
    "content_hash",
    "make_example",
    "ToolCallError",
    "split_holdout",
]
