"""Peak memory of a DPO training step: tether beside TRL's DPOTrainer, same model, data, settings.

Usage:
    .venv/bin/python benchmarks/memory.py                       # SmolLM2-135M-Instruct, CPU
    .venv/bin/python benchmarks/memory.py --model tiny          # a tiny random Llama (dev loop)
    .venv/bin/python benchmarks/memory.py --settings full,lora --steps 2

Settings (each run by both tether and TRL, each pair of runs in its own subprocesses):
  full       full fine-tuning, fp32 weights, AdamW
  lora       LoRA r=16 on q/k/v/o, fp32 base
  lora+gc    LoRA + non-reentrant gradient checkpointing
  full+gc    full fine-tuning + gradient checkpointing (not run by default)
  lora-bf16  LoRA with the frozen base stored in bf16, fp32 adapter (tether `model.base_dtype`,
             TRL `model_init_kwargs={"dtype": bfloat16}`; not run by default: CPU bf16 is slow)
Both sides precompute the reference log-probs (tether always does; TRL
`precompute_ref_log_probs=True`), so neither holds a second model during the steps.

What is measured, per run, on the CPU (no GPU here: RSS stands in for CUDA's allocated bytes):
- `loaded`: RSS right before the first optimizer step (model, data, cached reference, framework).
- `step peak`: the process's peak RSS over the timed steps. The kernel's high-water mark is reset
  (`/proc/self/clear_refs` = 5) at `loaded`, so what model loading or the reference pass touched
  earlier does not count: this is the figure a GPU's `max_memory_allocated` over a step gives.
- `added`: step peak - loaded = gradients + optimizer state + the step's activations.
- `activations`: added - (4 B gradient + 8 B AdamW moments) x trainable params, an estimate of
  the activation memory alone (what gradient checkpointing cuts).
- bytes per parameter: step peak / all parameters.
Same 8 pairs x <=128 tokens per step as benchmarks/dpo_step.py (the HH pairs it picks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_step import MAX_LENGTH, PAIRS_PER_STEP, bench_pairs, smollm2_dir, tiny_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("full", "lora", "lora+gc")
ALL_SETTINGS = (*SETTINGS, "full+gc", "lora-bf16")
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
LEARNING_RATE = 5e-6


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


class StepWindow:
    """RSS at the start of the steps and the peak over them (the kernel's high-water mark, reset)."""

    def __init__(self) -> None:
        self.loaded_kib: int | None = None

    def start(self) -> None:
        if self.loaded_kib is None:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.loaded_kib = _status_kib("VmRSS")

    def peak_kib(self) -> int:
        return _status_kib("VmHWM")


def run_tether(setting: str, model_dir: Path, pairs: list, steps: int, window: StepWindow) -> dict:
    import torch

    from offline.config import ModelConfig, TrainConfig
    from offline.models import load_policy
    from offline.reference import ensure_reference_logps
    from offline.tokenize import tokenize_pairs
    from offline.train import train

    cfg = ModelConfig(
        name_or_path=str(model_dir), lora=LORA if setting.startswith("lora") else None,
        base_dtype="bfloat16" if setting == "lora-bf16" else None,
        gradient_checkpointing=setting.endswith("+gc"),
    )
    state = Path(tempfile.mkdtemp(prefix="mem-bench-"))
    policy = load_policy(cfg, state, device="cpu")
    tokenized = tokenize_pairs(pairs, policy.tokenizer, MAX_LENGTH, MAX_LENGTH - 8)
    reference = ensure_reference_logps(policy, tokenized, model_dir, None, 16, progress=False)
    train_cfg = TrainConfig(batch_size=PAIRS_PER_STEP, max_steps=steps, learning_rate=LEARNING_RATE,
                            seed=0, save_every=None)
    window.start()
    train(policy.model, tokenized, reference, train_cfg, pad_token_id=policy.tokenizer.pad_token_id,
          progress=False)
    return _counts(policy.model)


def run_trl(setting: str, model_dir: Path, pairs: list, steps: int, window: StepWindow) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Start(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            window.start()  # first call only: after the dataloader, the reference pass, the model

    os.environ["TQDM_DISABLE"] = "1"
    gc_on = setting.endswith("+gc")
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False,
        gradient_checkpointing=gc_on,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc_on else None,
        per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=LEARNING_RATE, max_length=MAX_LENGTH, precompute_ref_log_probs=True,
        precompute_ref_batch_size=16, logging_steps=10_000, save_strategy="no", disable_tqdm=True,
        seed=0, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.bfloat16 if setting == "lora-bf16" else torch.float32},
    )
    peft_config = None
    if setting.startswith("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft_config, callbacks=[Start()])
    trainer.train()
    return _counts(trainer.model)


def _counts(model) -> dict:  # noqa: ANN001
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": params, "trainable": trainable}


def run_one(side: str, setting: str, model_dir: Path, pairs_json: Path, steps: int) -> dict:
    from offline.pairs import PreferencePair

    pairs = [PreferencePair(**p) for p in json.loads(pairs_json.read_text())]
    window = StepWindow()
    t0, c0 = time.perf_counter(), time.process_time()
    counts = (run_tether if side == "tether" else run_trl)(setting, model_dir, pairs, steps, window)
    if window.loaded_kib is None:
        raise RuntimeError(f"{side}/{setting}: the step window never started (no optimizer step ran)")
    peak = window.peak_kib()
    return {"side": side, "setting": setting, "loaded_mib": window.loaded_kib / 1024, "peak_mib": peak / 1024,
            "added_mib": (peak - window.loaded_kib) / 1024, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, **counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {ALL_SETTINGS}")
    ap.add_argument("--state-dir", type=Path, default=Path(os.environ.get("TETHER_STATE_DIR", ROOT / ".tether")))
    ap.add_argument("--run", help=argparse.SUPPRESS)  # internal: "side:setting", print JSON
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        import torch

        torch.set_num_threads(args.threads)
        side, setting = args.run.split(":", 1)
        print(json.dumps(run_one(side, setting, args.model_dir, args.pairs, args.steps)))
        return
    settings = args.settings.split(",")
    unknown = sorted(set(settings) - set(ALL_SETTINGS))
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {ALL_SETTINGS}")

    t0 = time.perf_counter()
    model_dir = (smollm2_dir if args.model == "smollm2" else tiny_dir)(args.state_dir)
    work = Path(tempfile.mkdtemp(prefix="mem-bench-"))
    (work / "pairs.json").write_text(json.dumps(bench_pairs(model_dir, PAIRS_PER_STEP * args.steps)))
    rows = []
    for setting in settings:
        for side in ("tether", "trl"):
            cmd = [sys.executable, __file__, "--run", f"{side}:{setting}", "--model-dir", str(model_dir),
                   "--pairs", str(work / "pairs.json"), "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{side}/{setting} failed:\n{out.stderr[-4000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {side}/{setting}: step peak {rows[-1]['peak_mib']:.0f} MiB", file=sys.stderr)
    report(rows, args, model_dir, time.perf_counter() - t0)


def report(rows: list[dict], args: argparse.Namespace, model_dir: Path, wall: float) -> None:
    by = {(r["side"], r["setting"]): r for r in rows}
    load = os.getloadavg()
    print(f"# memory  {datetime.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{args.threads}, load avg (1/5 min) at the end {load[0]:.1f}/{load[1]:.1f}; bench wall {wall:.0f} s")
    print(f"# model {model_dir.name} ({rows[0]['params'] / 1e6:.1f}M params), {PAIRS_PER_STEP} pairs/step, "
          f"<= {MAX_LENGTH} tokens a row, {args.steps} steps, reference log-probs precomputed on both sides")
    print("| setting | side | trainable | loaded MiB | step peak MiB | added MiB | activations MiB (est.) "
          "| peak B/param | peak vs TRL | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        activations = r["added_mib"] - 12 * r["trainable"] / 2**20
        peer = by.get(("trl", r["setting"]))
        ratio = f"{r['peak_mib'] / peer['peak_mib']:.2f}x" if r["side"] == "tether" and peer else ""
        print(f"| {r['setting']} | {r['side']} | {r['trainable'] / 1e6:.2f}M | {r['loaded_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['added_mib']:.0f} | {activations:.0f} | "
              f"{r['peak_mib'] * 2**20 / r['params']:.1f} | {ratio} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    for side in ("tether", "trl"):
        plain, gc = by.get((side, "lora")), by.get((side, "lora+gc"))
        if plain and gc:
            print(f"{side}: gradient checkpointing cut the LoRA step's added memory "
                  f"{plain['added_mib']:.0f} -> {gc['added_mib']:.0f} MiB "
                  f"({1 - gc['added_mib'] / plain['added_mib']:.0%})")
    print("added = gradients + AdamW state + the step's activations; activations (est.) = added - 12 B x "
          "trainable params. RSS on CPU stands in for a GPU's allocated bytes (no GPU here).")


if __name__ == "__main__":
    main()
