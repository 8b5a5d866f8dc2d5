"""The contract between the daemon and the trainer child process: a `TrainJob` in, progress lines and a
`TrainResult` out (JSON lines on the child's stdout: {"event": "progress", ...} then one {"event": "result", ...}).

The job carries everything the child needs (examples included), so the child never opens the replay store and a
killed child leaves nothing to clean up but its staging folder.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class TrainExample(BaseModel):
    id: str
    kind: Literal["chat", "completion", "document"]
    prompt: list[dict] | str | None = None
    answer: str


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
    batches: list[list[TrainExample]]      # one inner list per optimizer step, already mixed
    eval_sets: dict[str, list[TrainExample]] = {}   # "new", "anchor", "recall": scored before and after training
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


class EvalScores(BaseModel):
    """One eval set's scores before (parent adapter, or base model) and after the update (candidate).

    `parent`/`candidate`: token-weighted mean answer-token loss (nats/token); the lists hold per-example values
    in the order of `ids` (`trainer.scoring`: loss, greedy exactness); `*_kl`: mean over examples of the
    per-token KL(base || model) in nats, for sets named in `TrainJob.kl_sets` only."""

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
    phases: dict[str, float] = {}         # seconds: load, eval_before, train, eval_after, save
