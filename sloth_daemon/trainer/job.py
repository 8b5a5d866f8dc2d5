"""The contract between the daemon and the trainer child process: a `TrainJob` in, progress lines and a
`TrainResult` out (JSON lines on the child's stdout: {"event": "progress", ...} then one {"event": "result", ...}).

The job carries everything the child needs (examples included), so the child never opens the replay store and a
killed child leaves nothing to clean up but its staging folder. Each example's text is in the job once
(`examples`, by id); batches and eval sets list ids. A long update repeats the same few examples in thousands of
steps, so a job that repeated their text per step grew to hundreds of megabytes (a 2 MB taught prompt made a
407 MB job file). Callers may still pass `batches`/`eval_sets` as lists of `TrainExample`s (or their dicts): they
are moved into `examples` when the job is built.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator


class TrainExample(BaseModel):
    id: str
    kind: Literal["chat", "completion", "document"]
    prompt: list[dict] | str | None = None
    answer: str
    tools: list[dict] | None = None       # OpenAI tools the chat prompt offered (rendered by the template)
    tool_calls: list[dict] | None = None  # the answer's tool calls (`answer` is then the text before them)


class LoraSpec(BaseModel):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainJob(BaseModel):
    base_model: str
    chat_template: str | None = None       # Jinja text the daemon renders chat prompts with; None = the model's own
    parent_adapter: str | None = None      # folder of the adapter to continue from; None = fresh LoRA on the base
    output_dir: str                        # staging folder the adapter is written into
    batches: list[list[str]]               # example ids of each mixed batch (one optimizer step, unpacked)
    eval_sets: dict[str, list[str]] = {}   # example ids of "new", "anchor", "recall": scored before and after
    examples: dict[str, TrainExample] = {}  # every example the batches and eval sets name, once, by id
    kl_sets: list[str] = []                # eval sets whose KL to the base model is measured too (`scoring`)
    lora: LoraSpec = LoraSpec()
    learning_rate: float = 2e-3
    max_seq_len: int = 512
    quantize: Literal["nf4", "none"] = "none"
    kernels: bool = False
    offload: bool = False                  # with kernels: checkpointed layer inputs on pinned host memory
    device: str = "cpu"
    seed: int = 0
    pack: bool = False                     # pack each step's examples into rows of max_seq_len tokens (packing.py)
    step_tokens: int = 0                   # with pack: merge consecutive batches into steps of about this many tokens
    distill: list[str] = []                # example ids (anchors) trained on KL to the base, not their answer (distill.py)
    weight_decay: float = 0.0             # AdamW's decoupled decay of the LoRA weights toward zero (the base)
    distill_weight: float = 1.0            # weight of those examples' KL tokens against the cross-entropy tokens

    @model_validator(mode="before")
    @classmethod
    def _reference_examples(cls, data: Any) -> Any:
        """Batches and eval sets given as examples become id lists; their examples go into `examples`."""
        if not isinstance(data, dict):
            return data
        pool = dict(data.get("examples") or {})

        def ids(items: Any) -> Any:
            if not isinstance(items, list):
                return items  # pydantic reports the wrong type
            out = []
            for item in items:
                if not isinstance(item, str):
                    ex = item if isinstance(item, TrainExample) else TrainExample.model_validate(item)
                    pool.setdefault(ex.id, ex)
                    item = ex.id
                out.append(item)
            return out

        data = dict(data)
        if isinstance(data.get("batches"), list):
            data["batches"] = [ids(b) for b in data["batches"]]
        if isinstance(data.get("eval_sets"), dict):
            data["eval_sets"] = {k: ids(v) for k, v in data["eval_sets"].items()}
        data["examples"] = pool
        return data

    @model_validator(mode="after")
    def _references_resolve(self) -> "TrainJob":
        named = {i for b in self.batches for i in b} | {i for s in self.eval_sets.values() for i in s}
        missing = named - self.examples.keys()
        if missing:
            raise ValueError(f"batches or eval sets name examples the job does not carry: {sorted(missing)[:3]}")
        return self

    def batch_examples(self) -> list[list[TrainExample]]:
        """The examples of each batch, in order (the same objects where batches repeat an example)."""
        return [[self.examples[i] for i in b] for b in self.batches]

    def eval_examples(self) -> dict[str, list[TrainExample]]:
        """Each eval set's examples, by set name."""
        return {name: [self.examples[i] for i in ids] for name, ids in self.eval_sets.items()}

    def leave_out(self, ids: set[str]) -> None:
        """Remove the examples `ids` from the job (batches, eval sets and `examples`), in place."""
        self.batches = [[i for i in b if i not in ids] for b in self.batches]
        self.eval_sets = {k: [i for i in s if i not in ids] for k, s in self.eval_sets.items()}
        self.examples = {k: v for k, v in self.examples.items() if k not in ids}


class EvalScores(BaseModel):
    """One eval set's scores before (parent adapter, or base model) and after the update (candidate).

    `parent`/`candidate`: token-weighted mean answer-token loss (nats/token); the lists hold per-example values
    in the order of `ids` (`trainer.scoring`: loss, greedy exactness); `*_kl`: mean over examples of the
    per-token KL(base || model) in nats, for sets named in `TrainJob.kl_sets` only, and `*_kls` that KL per example
    (empty where not measured: a model without adapters is the base, KL 0)."""

    parent: float | None
    candidate: float | None
    examples: int
    ids: list[str] = []
    parent_losses: list[float] = []
    candidate_losses: list[float] = []
    parent_exact: list[bool] = []
    candidate_exact: list[bool] = []
    parent_kl: float | None = None
    candidate_kl: float | None = None
    parent_kls: list[float] = []
    candidate_kls: list[float] = []


class TrainResult(BaseModel):
    steps: int
    first_loss: float
    last_loss: float
    tokens: int
    seconds: float
    device: str
    quantized: bool
    kernels: str
    eval: dict[str, EvalScores]
    warm: bool = False                    # the base model was already loaded (a warm trainer's later update)
    processes: int = 1                    # trainer processes (more than 1: one per device, FSDP, `trainer.fsdp`)
    phases: dict[str, float] = {}         # seconds: load, eval_before, train, eval_after, save
