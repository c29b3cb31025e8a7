"""The online sections of the config tree: prompts, generation, judge, controller, gate, cycle.

Contract: this module imports pydantic and the offline config sections, nothing heavy (no torch,
transformers, httpx), so validating a config file stays fast. Each section documents the code it
configures: `PromptPoolConfig` -> `online.prompts`, `GenerationConfig` -> `online.generate`,
`JudgeConfig` and its kinds -> `online.judge` / `online.judge_local`, `ControllerConfig` ->
`online.controller`, `GateConfig` -> `online.gate`, `OnlineConfig` -> `online.cycle`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from offline.config import LAUNCH_FIELDS, DataConfig, ModelConfig, TrainConfig
from offline.section import Section


class ControllerConfig(Section):
    """KL budget and the bounds within which the controller moves the mix and beta."""

    kl_budget: float = Field(default=5.0, gt=0.0)
    """Most KL(policy || reference) per sequence, in nats, that a promoted policy may have."""
    target_fraction: float = Field(default=0.8, gt=0.0, le=1.0)
    """Fraction of the budget the controller aims under (headroom for estimator noise)."""
    min_anchor_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    """Anchor (offline) share of a cycle's training pairs when the KL is near zero."""
    max_anchor_fraction: float = Field(default=0.8, ge=0.0, le=1.0)
    """Anchor share once the KL reaches the target (and whenever it is over budget)."""
    relax_step: float = Field(default=0.2, gt=0.0, le=1.0)
    """Most the anchor fraction may fall in one cycle (rises are never limited)."""
    adapt_beta: bool = False
    """Also adapt the DPO beta (raise it when KL is above target, lower it when below)."""
    beta_min: float = Field(default=0.01, gt=0.0)
    """Lowest beta the controller may set."""
    beta_max: float = Field(default=1.0, gt=0.0)
    """Highest beta the controller may set."""
    beta_step: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Largest relative change of beta in one cycle (0.2: x0.8 .. x1.2)."""

    @model_validator(mode="after")
    def _ordered(self) -> ControllerConfig:
        if self.min_anchor_fraction > self.max_anchor_fraction:
            raise ValueError("min_anchor_fraction must be <= max_anchor_fraction")
        if self.beta_min > self.beta_max:
            raise ValueError("beta_min must be <= beta_max")
        return self


class GateConfig(Section):
    """When a candidate counts as a regression."""

    tolerance: float = Field(default=0.02, ge=0.0)
    """Largest drop per category (reward units or win-rate points) the gate accepts: the lower
    confidence bound must be >= -tolerance (reward) or >= 0.5 - tolerance (win rate)."""
    metric: Literal["reward", "win_rate"] = "reward"
    """Compare rule/reward-model rewards, or the judge's win rate against the current policy."""
    min_decisive: int = Field(default=30, ge=2)
    """Fewest decisive judgments (win_rate: non-tie) or reward samples per compared category,
    and overall, for a verdict; with fewer the cycle is inconclusive and not promoted."""
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    """Two-sided confidence of the interval whose lower end must clear the tolerance."""
    max_length_ratio: float | None = Field(default=1.5, gt=1.0)
    """Most the candidate's mean eval response length (tokens) may be over its parent's (1.5:
    50% longer); above it the gate rejects (length drift games judges). None: no guard."""


class PromptPoolConfig(Section):
    """Where online prompts come from, how they are rendered, split and sampled."""

    path: Path | None = None
    """JSONL prompt file: `{"prompt", "category"?}` or MT-Bench `{"category", "turns"}` lines."""
    function: str | None = Field(default=None, pattern=r"^[\w.]+:\w+$")
    """Python callable `module:function` returning (prompt, category) tuples (instead of `path`),
    or (prompt, category, heldout) triples that choose their side of the split themselves."""
    function_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments `function` is called with (e.g. the question file a templated pool reads)."""
    chat_template: bool = False
    """Render each prompt as one user turn with the tokenizer's chat template."""
    heldout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Fraction of prompts kept for evaluation (chosen by a hash of the prompt text)."""
    heldout_categories: tuple[str, ...] = ()
    """Categories held out whole from generation: evaluated only (out-of-distribution check)."""
    sample_per_cycle: int = Field(default=32, gt=0)
    """Prompts drawn per online cycle."""
    category_balanced: bool = False
    """Draw categories round-robin (equal counts) instead of in proportion to the pool."""

    @model_validator(mode="after")
    def _one_source(self) -> PromptPoolConfig:
        if (self.path is None) == (self.function is None):
            raise ValueError("set exactly one of `path` (a JSONL file) or `function` (module:function)")
        if self.function_kwargs and self.function is None:
            raise ValueError("function_kwargs is set but there is no `function` to call with them")
        return self


class GenerationConfig(Section):
    """How the policy's samples are produced (backend and sampling parameters)."""

    backend: Literal["hf", "openai", "vllm"] = "hf"
    """hf: transformers in-process (CPU default); openai: a completions server; vllm: in-process GPU."""
    k: int = Field(default=4, ge=2)
    """Responses sampled per prompt (pairs are formed among them)."""
    temperature: float = Field(default=1.0, gt=0.0)
    """Softmax temperature (1.0 samples the policy itself)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (1.0 = off)."""
    max_new_tokens: int = Field(default=64, gt=0)
    """Most tokens per response."""
    batch_size: int = Field(default=16, gt=0)
    """hf backend: prompts per `generate` call (each expands to k sequences)."""
    base_url: str | None = None
    """openai backend: server root including the API prefix, e.g. http://localhost:8000/v1."""
    model: str | None = None
    """openai backend: served model name; default the checkpoint dir (vllm serve's default name)."""
    api_key_env: str = "TETHER_GENERATION_API_KEY"
    """openai backend: name of the env var holding the API key (unset = no auth header)."""
    concurrency: int = Field(default=8, gt=0)
    """openai backend: requests in flight at once."""
    timeout_s: float = Field(default=60.0, gt=0.0)
    """openai backend: per-request timeout, seconds."""
    max_retries: int = Field(default=3, ge=0)
    """openai backend: re-sends after a 408/409/425/429/5xx, a timeout, a connection error or a malformed reply."""
    retry_backoff_s: float = Field(default=0.5, ge=0.0)
    """openai backend: first retry delay, doubled each retry up to 30 s, with jitter (see `online.http`)."""
    api: Literal["completions", "chat"] = "completions"
    """openai backend: `completions` sends the prompt text as is to `/completions` (it already
    carries the chat template: the server continues exactly what the trainer scores); `chat`
    sends it as one user message to `/chat/completions`, for servers without `/completions`
    (the server applies its own template, so `prompts.chat_template` must be off)."""
    token_ids_prompt: bool = False
    """openai backend, `api: completions`: send the prompt as token ids (the policy tokenizer's,
    no special tokens) instead of text, so the server cannot tokenise it differently. vLLM's
    server accepts this; servers that take only text (`transformers serve`) answer 4xx."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """openai backend: extra JSON fields for every request, for a server's own sampling knobs,
    e.g. `{"top_k": -1}` (vLLM) or `{"generation_config": "{\"do_sample\": true, \"top_k\": 0}"}`
    (`transformers serve`, which otherwise decodes greedily). May not set a field tether sets."""
    vllm_gpu_memory_utilization: float = Field(default=0.3, gt=0.0, le=0.95)
    """vllm backend: the share of the GPU's memory vLLM may take (weights + KV cache). The
    policy being trained is on the same GPU in the same process, and vLLM refuses to start when
    less than this share is free (its own default, 0.9, fails beside any sizeable policy)."""
    vllm_max_model_len: int | None = Field(default=None, gt=0)
    """vllm backend: longest prompt + response in tokens (None: the model's own limit, which
    may need more KV cache than the memory share above holds)."""

    @model_validator(mode="after")
    def _server_needs_url(self) -> GenerationConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError(
                "generation.backend 'openai' needs generation.base_url (e.g. http://localhost:8000/v1)"
            )
        if self.token_ids_prompt and self.api != "completions":
            raise ValueError("generation.token_ids_prompt needs generation.api 'completions' (chat takes messages)")
        clash = sorted(set(self.extra_body) & GENERATION_REQUEST_FIELDS)
        if clash:
            raise ValueError(
                f"generation.extra_body may not set {clash}: tether sets them from the generation section"
            )
        return self


GENERATION_REQUEST_FIELDS = frozenset(
    {"model", "prompt", "messages", "n", "temperature", "top_p", "max_tokens", "seed"}
)
"""The fields of a generation request that come from `GenerationConfig` (see `online.generate`)."""


class LLMJudgeConfig(Section):
    """A pairwise judge behind an OpenAI-compatible chat completions API."""

    base_url: str = Field(pattern=r"^https?://\S+$")
    """API root, e.g. `https://api.openai.com/v1` (`/chat/completions` is appended)."""
    model: str = Field(min_length=1)
    """Judge model name sent in each request."""
    api_key_env: str = Field(default="TETHER_JUDGE_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Environment variable holding the API key (unset: no Authorization header is sent)."""
    concurrency: int = Field(default=8, gt=0, le=1024)
    """Requests in flight at once."""
    timeout_s: float = Field(default=30.0, gt=0)
    """Per-request timeout (connect, read, write and pool wait each), seconds."""
    max_retries: int = Field(default=5, ge=0)
    """Re-sends after a 408/409/425/429/5xx, timeout, connection error or malformed reply before giving up."""
    backoff_base_s: float = Field(default=0.5, gt=0)
    """First backoff wait; doubles each retry, with jitter (when no Retry-After is sent)."""
    backoff_max_s: float = Field(default=20.0, gt=0)
    """Cap on one exponential backoff wait (a server's Retry-After is honoured up to 120 s; longer gives up)."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature of the judge (0: deterministic verdicts, which makes caching sound)."""
    max_tokens: int = Field(default=16, gt=0)
    """Completion token cap; the verdict is one token."""
    price_prompt_per_mtok: float = Field(default=0.0, ge=0.0)
    """USD per 1M prompt tokens."""
    price_completion_per_mtok: float = Field(default=0.0, ge=0.0)
    """USD per 1M completion tokens."""
    cache_dir: str | None = None
    """Directory for the persistent verdict cache (None: in-memory only)."""

    @model_validator(mode="after")
    def _backoff_order(self) -> LLMJudgeConfig:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be >= backoff_base_s")
        return self


class RewardModelJudgeConfig(Section):
    """A local reward model (sequence classification, one label) scoring each response."""

    path: str = Field(min_length=1)
    """Directory of a transformers model + tokenizer (`save_pretrained` layout)."""
    batch_size: int = Field(default=16, gt=0)
    """Sequences per forward pass."""
    min_margin: float = Field(default=0.0, ge=0.0)
    """Smallest best-minus-worst score difference that makes a label (below: tie)."""
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    """Torch device; "auto" picks cuda when available, else cpu."""


class RuleJudgeConfig(Section):
    """A python scoring function `module:function(prompt, response) -> float`."""

    function: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
    """Import path of the scorer, `package.module:function`."""
    min_margin: float = Field(default=0.0, ge=0.0)
    """Smallest best-minus-worst score difference that makes a label (below: tie)."""
    eval_function: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
    """The scorer evaluation and the gate use instead of `function` (e.g. pass/fail where the
    judge gives partial credit to rank two failures); None: `function` itself."""


class JudgeAuditConfig(Section):
    """The judge's audit against the static dataset's human labels (`online.audit`)."""

    enabled: bool | None = None
    """Audit before a cycle labels with this judge (None: yes for llm judges, no for rule and
    reward-model judges, which `tether judge audit` can still audit on request)."""
    pairs: int = Field(default=64, gt=0, le=100_000)
    """Held-out pairs of the static dataset the judge is asked about (an LLM judge in both
    orders; a reward model or rule scores each reply once)."""
    min_agreement: float = Field(default=0.6, ge=0.0, le=1.0)
    """Least agreement with the human label, over the pairs the judge decided, to label with it."""
    max_position_conflict: float = Field(default=0.4, ge=0.0, le=1.0)
    """Most pairs (share of those answered) where both orders named the same letter (LLM judges;
    not applicable to reward-model and rule judges, which score each reply alone)."""
    max_unparseable: float = Field(default=0.5, ge=0.0, le=1.0)
    """Most pairs (share of those answered) with a verdict that could not be read."""
    enforce: bool = True
    """Refuse to run a cycle (and `tether demo` / `tether report` to score with the judge) when it
    is below these thresholds (false: warn, and label anyway)."""

    def active(self, kind: str) -> bool:
        """Whether a cycle audits a judge of this kind."""
        return self.enabled if self.enabled is not None else kind == "llm"


class JudgeConfig(Section):
    """Which judge labels online pairs, and the per-cycle API budget."""

    kind: Literal["llm", "reward_model", "rule"]
    """Judge kind; the section of the same name must be present."""
    llm: LLMJudgeConfig | None = None
    """Settings of the LLM judge (kind "llm")."""
    reward_model: RewardModelJudgeConfig | None = None
    """Settings of the reward-model judge (kind "reward_model")."""
    rule: RuleJudgeConfig | None = None
    """Settings of the rule judge (kind "rule")."""
    max_calls: int | None = Field(default=None, gt=0)
    """Most API requests per cycle, retries included (None: unlimited)."""
    max_cost_usd: float | None = Field(default=None, gt=0)
    """No new API request starts once a cycle has spent this much (None: unlimited)."""
    audit: JudgeAuditConfig = JudgeAuditConfig()
    """Agreement with human labels, position bias and parse rate, checked before labelling."""
    max_neutralised_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    """A cycle whose samples needed the reward-hacking guards more often than this is flagged."""

    @model_validator(mode="after")
    def _section_for_kind(self) -> JudgeConfig:
        if getattr(self, self.kind) is None:
            raise ValueError(f"judge kind is {self.kind!r} but the `{self.kind}` section is missing")
        return self


class AnchorConfig(Section):
    """A static dataset built once from pi_0's own samples, labelled by the judge
    (`data.path: "online:anchor"`; `online.anchor`)."""

    categories: tuple[str, ...] = Field(min_length=1)
    """Prompt-pool categories the static dataset covers (the others stay uncovered)."""
    prompts_per_category: int = Field(default=32, gt=0)
    """Training-side prompts drawn per covered category (fewer when the pool has fewer)."""
    k: int = Field(default=4, ge=2)
    """Samples of pi_0 per prompt; the judge pairs the best with the worst."""


class OnlineConfig(Section):
    """Online refresh cycles: what to generate, how to judge, how to mix, when to promote."""

    cycles: int = Field(default=2, ge=1)
    """Cycles `tether demo` (and `tether report`) run after the offline baseline."""
    prompts: PromptPoolConfig
    """The prompt pool (its held-out part is the evaluation and KL prompt set)."""
    generation: GenerationConfig = GenerationConfig()
    """How the current policy samples responses."""
    judge: JudgeConfig
    """Who labels the samples into preference pairs."""
    controller: ControllerConfig = ControllerConfig()
    """KL budget and the anchor-fraction/beta controller."""
    gate: GateConfig = GateConfig()
    """Promotion gate: regression tolerance and metric."""
    initial_anchor_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    """Anchor share of the first cycle's training set (later cycles: the controller's)."""
    train_pairs: int = Field(default=128, gt=0)
    """Pairs in each cycle's mixed training set."""
    train: TrainConfig | None = None
    """Training settings for cycles (None: the top-level `train` section)."""
    anchor: AnchorConfig | None = None
    """Build the static dataset from pi_0's samples (with `data.path: "online:anchor"`)."""
    min_fresh_pairs: int = Field(default=8, ge=0)
    """Fewest labels the judge must produce in a cycle for it to train; with fewer the cycle is
    recorded inconclusive (not trained, not promoted, the mix unchanged). 0: always train."""
    eval_samples: int = Field(default=2, ge=1)
    """Samples per held-out prompt when scoring a policy."""
    eval_max_prompts: int = Field(default=96, gt=0)
    """At most this many held-out prompts per evaluation (first N, fixed across cycles)."""
    kl_prompts: int = Field(default=32, gt=0)
    """Held-out prompts the KL(policy || reference) estimate samples from."""
    kl_samples: int = Field(default=2, ge=1)
    """Policy samples per KL prompt."""
    lock_ttl_s: float = Field(default=120.0, gt=0)
    """The cycle lock expires this long after a crashed holder's last heartbeat (sent every ttl/3)."""
    on_busy: Literal["skip", "wait"] = "skip"
    """When another cycle holds the lock: skip this run (and say so), or wait for it."""
    wait_timeout_s: float | None = Field(default=None, gt=0)
    """With on_busy=wait: give up after this long (None: wait as long as it takes)."""

    @model_validator(mode="after")
    def _one_chat_template(self) -> OnlineConfig:
        gen = self.generation
        if gen.backend == "openai" and gen.api == "chat" and self.prompts.chat_template:
            raise ValueError(
                "generation.api 'chat' with prompts.chat_template: the server applies the chat template "
                "to the message, which would then be templated twice; set prompts.chat_template: false "
                "(or use generation.api: completions, which sends the templated text as is)"
            )
        return self


@dataclass
class CycleInputs:
    """The config sections a cycle (and online evaluation) reads, plus where it keeps state."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    online: OnlineConfig
    state_dir: Path
    name: str
    seed: int = 0
    config_dump: dict[str, Any] = field(default_factory=dict)

    @property
    def cycle_train(self) -> TrainConfig:
        """`online.train` (else `train`). How training is launched (`num_processes`,
        `accelerate_config`) is the machine's, not the cycle's: `online.train` inherits it from
        `train` unless it sets it itself."""
        own = self.online.train
        if own is None:
            return self.train
        inherit = {k: getattr(self.train, k) for k in LAUNCH_FIELDS if k not in own.model_fields_set}
        return own.model_copy(update=inherit) if inherit else own
