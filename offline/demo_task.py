"""The built-in demo task: digit-list transformations a rule can verify, and a tiny policy for them.

Contract:
- Prompts read `"<category> : d d d ="` (3-5 digits); the answer is space-separated digits.
  Six categories: `COVERED_CATEGORIES` (copy, reverse, increment) appear in the static
  preference dataset; `HELDOUT_CATEGORIES` (sort, rotate, double) never do, so only online
  cycles (policy samples judged by `rule_reward`) can improve them.
- `rule_reward(prompt, response)` is the online rule judge (`offline.demo_task:rule_reward`):
  the fraction of positions that match the expected answer, over the longer of the two lists.
- `make_demo_pairs` / `write_demo_dataset` / `demo_dataset_path` produce the static dataset:
  chosen = the right answer, rejected = it with 1-2 digits corrupted. Deterministic in the seed.
- `build_demo_policy(state_dir)` builds a word-level tokenizer and a ~80k-parameter Llama, SFTs
  it in-process on NOISY demonstrations of all six categories (each correct with probability
  `p_correct`, else 1-2 digits corrupted), and saves a plain HF dir under
  `state_dir/models/demo-tiny-<hash>/` (atomic; cached by a hash of every setting). The noise is
  the point: the policy samples right and wrong answers, so preference learning has something
  to fix. No downloads; ~20 s single-threaded.

Measured (shared 2-core CPU, seed 0, 600 prompts x 4 samples at T=1): the SFT policy's rule
reward is 0.69-0.83 per category sampled (greedy ~1.0, sort 0.95). Offline DPO, full fine-tuning,
on 3000 covered pairs (lr 1e-4, beta 0.1, 300 steps of 32, plus a per-token NLL term on chosen
with weight 1) lifts covered categories to 0.96-0.97 and leaves held-out ones near where they
were (sort 0.65, rotate 0.79, double 0.91); three online cycles on the policy's own samples
judged by `rule_reward` then lift those to 0.76/0.96/0.98. Without the NLL term DPO lowers EOS
(answers grow extra digits) and reward falls: the demo config needs the SFT term.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from offline.atomic import atomic_open, atomic_write
from offline.checkpoint import atomic_dir
from offline.pairs import PreferencePair

COVERED_CATEGORIES: tuple[str, ...] = ("copy", "reverse", "increment")
HELDOUT_CATEGORIES: tuple[str, ...] = ("sort", "rotate", "double")
CATEGORIES: tuple[str, ...] = COVERED_CATEGORIES + HELDOUT_CATEGORIES
MIN_DIGITS, MAX_DIGITS = 3, 5

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
# Role words are in the vocabulary so that text naming chat roles tokenises without <unk>s.
VOCAB: tuple[str, ...] = (
    SPECIAL_TOKENS + tuple(str(d) for d in range(10)) + CATEGORIES + (":", "=", "user", "assistant", "system")
)
# The prompt *is* the user message: the template renders contents only (assistant turns end in
# <eos>), so `apply_chat_template([{"role": "user", "content": p}])` == p and the 64-position
# model never spends context on role markers.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' <eos>' }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)

_BUILD_VERSION = "1"  # bump when the build code changes in a way the settings do not capture


def expected_answer(category: str, digits: Sequence[int]) -> list[int]:
    """The correct response digits for a category applied to a digit list."""
    d = list(digits)
    if category == "copy":
        return d
    if category == "reverse":
        return d[::-1]
    if category == "increment":
        return [(x + 1) % 10 for x in d]
    if category == "sort":
        return sorted(d)
    if category == "rotate":
        return d[1:] + d[:1]
    if category == "double":
        return [(2 * x) % 10 for x in d]
    raise ValueError(f"unknown demo category {category!r}; expected one of {CATEGORIES}")


def format_prompt(category: str, digits: Sequence[int]) -> str:
    return f"{category} : {' '.join(map(str, digits))} ="


def format_digits(digits: Sequence[int]) -> str:
    return " ".join(map(str, digits))


def parse_prompt(prompt: str) -> tuple[str, list[int]]:
    """(category, digits) of a demo prompt; ValueError if it is not one."""
    tokens = prompt.split()
    if (
        len(tokens) < 4
        or tokens[0] not in CATEGORIES
        or tokens[1] != ":"
        or tokens[-1] != "="
        or not all(len(t) == 1 and t.isdigit() for t in tokens[2:-1])
    ):
        raise ValueError(f"not a demo prompt (expected '<category> : d d d ='): {prompt!r}")
    return tokens[0], [int(t) for t in tokens[2:-1]]


def rule_reward(prompt: str, response: str) -> float:
    """Fraction of positions where `response` matches the expected answer, in [0, 1].

    Divided by max(len(expected), len(got)) so missing and extra digits both cost. Decoding
    stops at a literal `<eos>`; non-digit tokens never match. ValueError for a non-demo prompt.
    """
    category, digits = parse_prompt(prompt)
    expected = [str(x) for x in expected_answer(category, digits)]
    got = response.split("<eos>")[0].split()
    hits = sum(e == g for e, g in zip(expected, got))
    return hits / max(len(expected), len(got))


def _random_digits(rng: random.Random) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]


def _corrupt(answer: Sequence[int], rng: random.Random) -> list[int]:
    """The answer with 1-2 positions replaced by a different digit (always differs)."""
    out = list(answer)
    for i in rng.sample(range(len(out)), k=rng.randint(1, min(2, len(out)))):
        out[i] = (out[i] + rng.randint(1, 9)) % 10
    return out


def make_demo_pairs(
    n: int, categories: Iterable[str] = COVERED_CATEGORIES, seed: int = 0
) -> list[PreferencePair]:
    """`n` pairs, categories round-robin; chosen correct, rejected 1-2 digits off. Deterministic."""
    cats = tuple(categories)
    for c in cats:
        expected_answer(c, [0])  # validate early
    rng = random.Random(f"demo-pairs-{seed}")
    pairs = []
    for i in range(n):
        cat = cats[i % len(cats)]
        digits = _random_digits(rng)
        answer = expected_answer(cat, digits)
        pairs.append(
            PreferencePair(
                prompt=format_prompt(cat, digits),
                chosen=format_digits(answer),
                rejected=format_digits(_corrupt(answer, rng)),
                category=cat,
                source_id=f"demo-{seed}-{i:06d}",
            )
        )
    return pairs


def demo_prompts(
    categories: Iterable[str] = CATEGORIES, n: int = 64, seed: int = 0
) -> list[tuple[str, str]]:
    """`n` (prompt, category) pairs, categories round-robin: the online generation/eval pool."""
    cats = tuple(categories)
    rng = random.Random(f"demo-prompts-{seed}")
    return [
        (format_prompt(cats[i % len(cats)], _random_digits(rng)), cats[i % len(cats)])
        for i in range(n)
    ]


def demo_prompt_pool() -> list[tuple[str, str]]:
    """The demo's online prompt pool (`prompts.function` in configs/demo.yaml): 600 prompts, all
    six categories, 100 each; the pool's hash split holds some out for evaluation and KL."""
    return demo_prompts(CATEGORIES, n=600, seed=1)


def write_demo_dataset(path: Path, n: int = 3000, seed: int = 0) -> Path:
    """Write `n` covered-category pairs as JSONL (prompt/chosen/rejected/category/id), atomically.

    Each writer has its own temp file: two processes that find the file missing at once (two
    cycles racing for the lock) both write the same bytes and the last rename wins.
    """
    path = Path(path)
    with atomic_open(path, "w") as fh:
        for p in make_demo_pairs(n, COVERED_CATEGORIES, seed):
            row = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                   "category": p.category, "id": p.source_id}
            fh.write(json.dumps(row) + "\n")
    return path


def demo_dataset_path(state_dir: Path, n: int = 3000, seed: int = 0) -> Path:
    """Path of the static demo dataset under the state dir, generated when missing."""
    path = Path(state_dir) / "data" / f"demo-pairs-n{n}-s{seed}.jsonl"
    if not path.exists():
        write_demo_dataset(path, n=n, seed=seed)
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizer and tiny policy


def build_demo_tokenizer():
    """Word-level tokenizer over `VOCAB` (whitespace split), as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(list(SPECIAL_TOKENS))  # matched before splitting, skipped on decode
    # No decoder: tokenizers joins word-level tokens with single spaces, so "4 1 3" round-trips.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        model_max_length=64,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@dataclasses.dataclass(frozen=True)
class DemoPolicySettings:
    """Everything that determines the built policy; its hash names the cache dir."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 64
    sft_steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    p_correct: float = 0.5
    """Probability that an SFT demonstration is right; else 1-2 digits are corrupted."""

    def key(self, seed: int) -> str:
        blob = json.dumps(
            {"settings": dataclasses.asdict(self), "seed": seed, "vocab": VOCAB,
             "template": CHAT_TEMPLATE, "version": _BUILD_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _demo_model(tokenizer, s: DemoPolicySettings):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        max_position_embeddings=s.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def _sft_batch(tokenizer, rng: random.Random, s: DemoPolicySettings) -> tuple[torch.Tensor, ...]:
    """A right-padded batch of noisy demonstrations: (input_ids, attention_mask, labels), each (B, T)."""
    rows, prompt_lens = [], []
    for _ in range(s.batch_size):
        cat = rng.choice(CATEGORIES)
        digits = _random_digits(rng)
        answer = expected_answer(cat, digits)
        if rng.random() >= s.p_correct:
            answer = _corrupt(answer, rng)
        # Word-level vocab: token ids are a direct lookup (10x faster than calling the tokenizer).
        prompt = tokenizer.convert_tokens_to_ids(format_prompt(cat, digits).split())
        response = tokenizer.convert_tokens_to_ids(format_digits(answer).split())
        rows.append(prompt + response + [tokenizer.eos_token_id])
        prompt_lens.append(len(prompt))
    T = max(map(len, rows))
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100)  # loss on response + EOS only
    for i, (row, pl) in enumerate(zip(rows, prompt_lens)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, pl : len(row)] = torch.tensor(row[pl:])
    return input_ids, attention_mask, labels


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops single-threaded: for an ~80k-parameter model intra-op threads only add
    overhead, and on a shared 2-core machine they make each step ~7x slower (measured)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def sft_demo_policy(model, tokenizer, s: DemoPolicySettings, seed: int, progress: bool = True) -> float:
    """Plain NLL on noisy demonstrations of all categories; returns the last-50-step mean loss."""
    from rich.progress import Progress

    torch.manual_seed(seed)
    rng = random.Random(f"demo-sft-{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    warmup = max(1, s.sft_steps // 20)
    # Linear warmup then cosine decay to 10%: converges in few steps without late-step noise.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda step: min(1.0, (step + 1) / warmup)
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, s.sft_steps) / s.sft_steps))),
    )
    model.train()
    losses: list[float] = []
    with one_thread(), Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("SFT demo policy", total=s.sft_steps)
        for _ in range(s.sft_steps):
            input_ids, attention_mask, labels = _sft_batch(tokenizer, rng, s)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"SFT demo policy (loss {loss.item():.3f})")
    model.eval()
    tail = losses[-50:]
    return sum(tail) / len(tail)


def build_demo_policy(
    state_dir: Path,
    seed: int = 0,
    progress: bool = True,
    settings: DemoPolicySettings = DemoPolicySettings(),
) -> Path:
    """Build (or reuse) the SFT'd demo policy; returns its HF dir under `state_dir/models/`.

    Tests may pass small `settings.sft_steps` for a fast, differently-hashed, untrained policy.
    """
    final = Path(state_dir) / "models" / f"demo-tiny-{settings.key(seed)}"
    if final.is_dir():
        return final  # only ever renamed into place once fully written
    tokenizer = build_demo_tokenizer()
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seed the build without touching the caller's RNG
        torch.manual_seed(seed)
        model = _demo_model(tokenizer, settings)
        final_loss = sft_demo_policy(model, tokenizer, settings, seed, progress)
    info = {"settings": dataclasses.asdict(settings), "seed": seed, "sft_seconds":
            round(time.perf_counter() - t0, 2), "sft_final_loss": round(final_loss, 4),
            "covered": COVERED_CATEGORIES, "heldout": HELDOUT_CATEGORIES}
    try:
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write(tmp / "demo_task.json", json.dumps(info, indent=2) + "\n")
    except FileExistsError:
        pass  # a concurrent builder finished first; its result is identical in every setting
    return final


# ---------------------------------------------------------------------------------------------
# Measuring the policy


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    n_samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    max_new_tokens: int = MAX_DIGITS + 2,
) -> list[list[str]]:
    """`n_samples` decoded responses per prompt (left-padded batched `generate`; temperature 0 =
    greedy, one sample). The global RNG, the model's train/eval mode and the tokenizer's
    padding side are restored afterwards."""
    was_training = model.training
    model.eval()
    greedy = temperature <= 0
    n = 1 if greedy else n_samples
    device = next(model.parameters()).device
    saved_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation needs left pad
    out: list[list[str]] = []
    tiny = device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 10_000_000
    try:
        with one_thread() if tiny else contextlib.nullcontext(), \
                torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                kwargs = dict(do_sample=False) if greedy else dict(
                    do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, num_return_sequences=n,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    **kwargs,
                )  # (len(chunk) * n, T_prompt + new)
                texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                out.extend(texts[i * n : (i + 1) * n] for i in range(len(chunk)))
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)
    return out


def mean_rule_reward(
    model,
    tokenizer,
    prompts: Sequence[tuple[str, str]],
    n_samples: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Mean `rule_reward` of the policy's samples, per category of (prompt, category) pairs."""
    responses = sample_responses(model, tokenizer, [p for p, _ in prompts], n_samples, temperature, seed)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for (prompt, cat), samples in zip(prompts, responses):
        for r in samples:
            sums[cat] = sums.get(cat, 0.0) + rule_reward(prompt, r)
            counts[cat] = counts.get(cat, 0) + 1
    return {c: sums[c] / counts[c] for c in sums}
