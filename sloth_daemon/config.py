"""Daemon configuration: one validated pydantic model built from defaults < TOML file < environment < CLI flags.

Contract:
- `load_config(path, env, overrides)` returns a `DaemonConfig` or raises `ConfigError` whose message names the key
  (dotted, as in the TOML file, e.g. `train.learning_rate`) and the environment variable that sets it.
- Every setting can be set from the environment as `SLOTH_<KEY>` for top-level keys (`SLOTH_PORT`,
  `SLOTH_STATE_DIR`) and `SLOTH_<SECTION>_<KEY>` for sectioned ones (`SLOTH_TRAIN_STEPS`,
  `SLOTH_SCHEDULE_MIN_NEW_EXAMPLES`). Values from the environment are parsed as TOML scalars when they parse
  (so `SLOTH_TRAIN_STEPS=40` is an int), else kept as strings.
- Precedence: flag > env > config file > default. Under systemd, `$STATE_DIRECTORY` (from `StateDirectory=`)
  is the default `state_dir`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "SLOTH_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(_Section):
    """How one update trains (the recipe in `sloth_daemon.trainer.recipe`)."""

    steps: int | None = Field(
        None, ge=1, description="mixed batches per update; unset = derived from the data (epochs, min/max_steps)"
    )
    epochs: float = Field(2.0, gt=0, description="passes over the new examples per update (when steps is unset)")
    min_steps: int = Field(
        120, ge=1, description="least batches per derived update (few new examples need repeats; 120 is what bench_retention tuned the learning rate with)"
    )
    max_steps: int = Field(2000, ge=1, description="most batches per derived update")
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(3e-4, gt=0, description="AdamW peak rate (tuned by benchmarks/bench_retention.py)")
    anchor_loss: Literal["ce", "kl"] = Field(
        "kl", description="how anchors train: ce = cross-entropy on the answer text; kl = KL to the base model's whole "
        "next-token distribution on the anchor's answer (distillation, Li & Hoiem 2016; trainer/distill.py). With "
        "weight_decay 10 and mix.replay 0.4 it keeps sloth-tiny's built-in answers over 10 rounds where ce kept 82% "
        "(bench_retention)"
    )
    anchor_kl_weight: float = Field(1.0, gt=0, description="with anchor_loss = kl: weight of an anchor token's KL "
                                    "against a new or replayed token's cross-entropy")
    weight_decay: float = Field(
        10.0, ge=0, description="AdamW's decoupled weight decay of the LoRA weights: pulls the adapter toward zero, "
        "i.e. the model toward its base, so drift does not add up over updates (L2-SP, Li et al. 2018); 10 halved "
        "the drift per update on sloth-tiny, 30 forgot earlier facts (bench_retention; see anchor_loss)"
    )
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    max_seq_len: int = Field(512, ge=16)
    quantize: Literal["auto", "nf4", "none"] = Field(
        "auto", description="4-bit NF4 base via bitsandbytes; auto = nf4 on CUDA or when the embedded engine serves "
        "from NF4 (embedded.quantization), else none"
    )
    kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="patch the model with sloth_kernels; auto = on CUDA only"
    )
    offload_activations: bool = Field(
        True,
        description="with the kernels on CUDA: checkpointed layer inputs wait in pinned host memory between forward "
        "and backward (Llama-3.1-8B QLoRA on the H200: 0.8 GB less peak memory for ~7% of the speed; docs/kernels.md)",
    )
    seed: int = 0
    timeout_s: float = Field(3600, gt=0, description="an update running longer is killed and recorded as failed")
    warm: bool = Field(True, description="keep one trainer process with the base model loaded between updates")
    pack: bool = Field(True, description="pack each step's examples into rows of max_seq_len tokens")
    step_tokens: int | Literal["auto"] = Field(
        "auto", description="with pack: merge consecutive batches into optimizer steps of about this many tokens; "
        "0 = one batch per step; auto = 4096 on CUDA, 0 on CPU"
    )
    devices: list[str] = Field(
        [], description="where updates train: GPUs as cuda:N or N (several = one update across them: torchrun + "
        "FSDP), or cpu (repeated: that many CPU processes); empty = where the engine serves (`device`)"
    )

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: Any) -> list[str]:
        from .placement import check_train_devices

        return check_train_devices(v)

    @field_validator("step_tokens")
    @classmethod
    def _step_tokens(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return v


class MixConfig(_Section):
    """Share of each batch drawn from new, replayed and anchor examples (normalised)."""

    new: float = Field(0.4, ge=0)
    replay: float = Field(0.4, ge=0)
    anchor: float = Field(0.4, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> "MixConfig":
        if self.new + self.replay + self.anchor <= 0:
            raise ValueError("mix ratios must not all be zero")
        return self


class GateConfig(_Section):
    """Eval gate bounds: a candidate is promoted only if all hold."""

    min_new_loss_improvement: float = Field(
        0.0, description="candidate loss on new examples must be below parent loss minus this"
    )
    max_anchor_loss_increase: float = Field(
        0.5, ge=0, description="relative rise of held-out anchor (and held-out new) loss allowed (0.5 = +50%)"
    )
    anchor_loss_tolerance: float = Field(0.05, ge=0, description="absolute slack added to the anchor bound")
    max_recall_loss_increase: float = Field(0.5, ge=0, description="relative rise of loss on replayed examples allowed")
    recall_loss_floor: float = Field(0.05, ge=0, description="absolute slack added to the recall loss bound")
    anchor_holdout_fraction: float = Field(
        0.25, ge=0, lt=1, description="share of anchors never trained on, judged by the gate (fixed by id)"
    )
    max_anchor_kl: float = Field(
        0.25, ge=0, description="bound on the mean KL(base || candidate), nats/token, on held-out anchors"
    )
    max_anchor_kl_rise: float = Field(
        0.06, ge=0, description="bound on how much one update may raise that KL (nats/token): a normal update of a "
        "few facts adds 0.01-0.05 on sloth-tiny, five garbage answers to general prompts 0.07 (bench_retention)"
    )
    max_anchor_kl_median_rise: float = Field(
        0.01, ge=0, description="bound on the median over held-out anchors of one update's per-anchor KL rise "
        "(nats/token): a few facts move one or two probes (median 0.000-0.006 on sloth-tiny), garbage answers to "
        "general prompts or training without anchors move most (0.014-0.02; bench_retention)"
    )
    max_answers_lost: float = Field(
        0.05, ge=0, le=1, description="share of the learnt examples' exact greedy answers an update may lose"
    )
    max_anchor_answers_lost: float = Field(
        1.0, ge=0, le=1, description="share of the held-out anchors' exact greedy answers an update may lose; 1 = "
        "measured, not judged (a base model's answers to generic probes are often fragile: sloth-tiny's change when "
        "it learns anything; anchor_kl is the check of general behaviour)"
    )
    holdout_fraction: float = Field(0.2, ge=0, lt=1)
    min_holdout_examples: int = Field(10, ge=2, description="hold out new examples only when at least this many")
    max_eval_examples: int = Field(64, ge=1)


class ScheduleConfig(_Section):
    """When updates start on their own (manual triggers always work)."""

    enabled: bool = True
    min_new_examples: int = Field(8, ge=1, description="start an update once this many new examples wait")
    interval_minutes: float = Field(0, ge=0, description="also start one this often when any are waiting; 0 = off")
    check_seconds: float = Field(30, gt=0, description="how often the example count is checked")


class GenerationConfig(_Section):
    """Defaults for requests that leave them out."""

    max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(4096, ge=1, description="requests asking for more get HTTP 400")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class AnchorConfig(_Section):
    """Self-synthesised rehearsal: the base model's own answers to probe prompts, made at first start."""

    enabled: bool = True
    max_tokens: int = Field(96, ge=1)


class EmbeddedConfig(_Section):
    """The embedded engine (`engine = "embedded"`): transformers + peft in the daemon's process."""

    quantization: Literal["none", "nf4"] = Field(
        "none", description="none: serve the checkpoint's weights (bf16 on CUDA, fp32 on CPU); nf4: serve from "
        "bitsandbytes' 4-bit NF4 base (the trainer's quantisation; adapters hot-swap on it as before)"
    )


class VllmConfig(_Section):
    """The vLLM engine (`engine = "vllm"`): the server the daemon starts and supervises, or an existing one."""

    python: str | None = Field(None, description="python of vLLM's own venv; unset = the daemon's python")
    url: str | None = Field(None, description="use the vLLM server at this URL instead of starting one")
    extra_args: str = Field("", description="appended to vLLM's command line (shell-style quoting)")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="vLLM's share of GPU memory; the trainer gets what is left (see README)"
    )
    max_model_len: int | None = Field(None, ge=16, description="context length; unset = the model's own")
    dtype: str = Field("auto", description="vLLM --dtype (auto, bfloat16, float16, float32)")
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM --tensor-parallel-size: GPUs one server spans (from `device`'s index on)"
    )
    adapter_loading: Literal["path", "resolver"] = Field(
        "path", description="path: vLLM loads an adapter from the daemon's folder (same host or a shared disk); "
        "resolver: vLLM (vllm.url, another host) resolves each adapter name through the sloth-vllm-resolver "
        "plugin, which fetches the files from this daemon over HTTP"
    )
    max_loras: int = Field(2, ge=2, description="adapters in one batch (old and new during a swap: at least 2)")
    max_lora_rank: int | None = Field(None, ge=1, description="unset = from train.lora_r (rounded up for vLLM)")
    startup_timeout_s: float = Field(600, gt=0, description="vLLM must answer /health within this")
    sleep_during_updates: bool = Field(
        False, description="vLLM sleeps (frees GPU memory, serving pauses) while an update trains"
    )
    tool_call_parser: str = Field(
        "auto", min_length=1, description="vLLM's --tool-call-parser for tool calls (hermes, llama3_json, ...); auto = "
        "from the chat template on a vLLM the daemon starts; daemon = the daemon parses them itself",
    )


class LimitsConfig(_Section):
    """Size limits on what clients send (over a limit: HTTP 413 / ZeroMQ too_large naming the field)."""

    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest HTTP request body")
    max_prompt_chars: int = Field(32_000, ge=1, description="largest taught prompt (all its messages together)")
    max_answer_chars: int = Field(32_000, ge=1, description="largest taught answer or correction")
    max_document_chars: int = Field(
        2_000_000, ge=1, description="largest taught document (split into chunks of train.max_seq_len tokens)"
    )


class RetentionConfig(_Section):
    """What old state is deleted after each update (and at start)."""

    keep_last: int = Field(
        20, ge=1, description="keep the run folders and rejected adapters of the last N updates; promoted adapters "
        "and their run folders are always kept",
    )


class DaemonConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    zmq: str = Field(
        "auto",
        description="ZeroMQ address(es), comma-separated ipc://PATH or tcp://HOST:PORT; 'auto' = "
        "ipc://$RUNTIME_DIRECTORY/api.sock under systemd, else ipc://<state_dir>/api.sock; 'off' = no ZeroMQ",
    )
    zmq_max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger ZeroMQ requests are refused")
    zmq_max_inflight: int = Field(16, ge=1, description="requests one ZeroMQ client may have running at once")
    max_queued_requests: int = Field(
        64, ge=1, description="generation requests queued or running on the engine at once (HTTP and ZeroMQ "
        "together); more are refused with HTTP 429 / ZeroMQ busy")
    http_header_timeout_s: float = Field(10, gt=0, description="an HTTP client must send its request head within this")
    http_body_timeout_s: float = Field(30, gt=0, description="... and its body within this (else 408)")
    http_keep_alive_s: int = Field(5, ge=1, description="an idle keep-alive HTTP connection is closed after this")
    idempotency_window_s: float = Field(
        600, ge=0, description="a generation request retried with the same Idempotency-Key header (ZeroMQ: the same "
        "id) within this long gets the first answer again; 0 = off")
    store_busy_timeout_s: float = Field(
        2.0, gt=0, description="a replay-store call waits at most this long for SQLite's lock, then fails with 503 "
        "(answered turns go to the journal instead)")
    umask: str = Field(
        "0077", pattern=r"^0?[0-7]{3}$", description="the daemon's file-creation mask (octal); the state dir and "
        "the store's files are tightened to it at start (the systemd unit sets 0027: group may read)")
    state_dir: Path = Field(Path("./sloth-state"), validate_default=True)
    model: str | None = Field(None, description="local Hugging Face model folder; unset = built-in tiny model")
    served_model_name: str | None = Field(None, description="name in /v1/models; default: the model folder's name")
    chat_template: str | None = Field(
        None, description="a Jinja chat template file used instead of the model's own (like vLLM's --chat-template)"
    )
    api_key: str | None = Field(None, description="if set, HTTP requests need 'Authorization: Bearer <key>'")
    metrics_open_on_loopback: bool = Field(
        False, description="GET /metrics from a loopback address needs no API key (a Prometheus on this host)"
    )
    cors_allowed_origins: list[str] = Field(
        [], description="browser origins (scheme://host[:port], or '*') allowed to call the HTTP API; empty = none"
    )
    engine: Literal["embedded", "vllm"] = "embedded"
    device: str = Field("auto", description="where the engine serves: auto, cpu, cuda or cuda:N (placement.py)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")
    shutdown_grace_s: float = Field(
        30, ge=0, description="on SIGTERM, requests in flight get this long to finish before they are cut off"
    )
    train: TrainConfig = TrainConfig()
    mix: MixConfig = MixConfig()
    gate: GateConfig = GateConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    generation: GenerationConfig = GenerationConfig()
    anchors: AnchorConfig = AnchorConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    limits: LimitsConfig = LimitsConfig()
    vllm: VllmConfig = VllmConfig()
    retention: RetentionConfig = RetentionConfig()

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, v: str | None) -> str | None:
        if v:
            path = Path(v).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"{path}: no such file (give the path of a Jinja chat template)")
            return str(path)
        return None

    @field_validator("cors_allowed_origins", mode="before")
    @classmethod
    def _origins(cls, v: Any) -> Any:
        if isinstance(v, str):  # from the environment: SLOTH_CORS_ALLOWED_ORIGINS=http://a:3000,http://b
            v = [o for o in (x.strip() for x in v.split(",")) if o]
        if isinstance(v, list):
            for origin in v:
                if isinstance(origin, str) and origin != "*" and (
                        "://" not in origin or origin.endswith("/") or origin.count("/") > 2):
                    raise ValueError(f"{origin!r}: an origin is scheme://host[:port] with no path (or '*')")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        from .placement import check_device

        return check_device(v)

    @field_validator("umask", mode="before")
    @classmethod
    def _umask_text(cls, v: Any) -> Any:
        return f"{v:03d}" if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("zmq")
    @classmethod
    def _zmq_addresses(cls, v: str) -> str:
        from .api.zmq_protocol import check_address

        v = v.strip()
        if v not in ("auto", "off"):
            addresses = [a.strip() for a in v.split(",") if a.strip()]
            if not addresses:
                raise ValueError("give 'auto', 'off' or ipc://PATH / tcp://HOST:PORT addresses")
            for a in addresses:
                check_address(a)
        return v

    @property
    def replay_db(self) -> Path:
        return self.state_dir / "replay.db"

    @property
    def adapters_dir(self) -> Path:
        return self.state_dir / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key and where it came from."""


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(path).upper()


def _setting_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(_setting_paths(ann, prefix + (name,)))
        else:
            paths.append(prefix + (name,))
    return paths


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Build the config. `overrides` maps dotted keys (`"port"`, `"train.steps"`) to flag values; None = unset."""
    env = os.environ if env is None else env
    tree: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    path = path or env.get(ENV_PREFIX + "CONFIG")
    if path:
        p = Path(path)
        try:
            tree = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    for sp in _setting_paths(DaemonConfig):
        name = env_name(sp)
        if name in env:
            _set(tree, sp, _parse_env_value(env[name]))
            sources[sp] = f"environment variable {name}"
    for dotted, value in (overrides or {}).items():
        if value is not None:
            sp = tuple(dotted.split("."))
            _set(tree, sp, value)
            sources[sp] = "command-line flag"
    if "state_dir" not in tree and env.get("STATE_DIRECTORY"):
        # systemd's StateDirectory= (first entry): it replaces the default only; file, env and flag still win.
        tree["state_dir"] = env["STATE_DIRECTORY"].split(":")[0]
        sources[("state_dir",)] = "environment variable STATE_DIRECTORY (systemd)"
    try:
        return DaemonConfig.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(str(x) for x in err["loc"] if not isinstance(x, int))
            key = ".".join(loc)
            origin = sources.get(loc, f"config file {path}" if path else "default")
            hint = f" (set by {origin}; env {env_name(loc)})" if loc else ""
            lines.append(f"{key or '<root>'}: {err['msg']}{hint}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
