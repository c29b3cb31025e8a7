"""Generation: k sampled responses per prompt from the current policy, behind one interface.

Contract: `build_generator(cfg, model_dir, policy_version, model=None, tokenizer=None) ->
Generator`, whose `generate(prompts, k, seed) -> list[Generation]` returns one `Generation`
per `(prompt, category)`, in order, each with exactly `k` responses (prompt stripped, cut at
EOS). Three backends:

- `hf`: transformers `generate` in-process (the CPU default; reuses a loaded model+tokenizer).
- `openai`: any OpenAI-compatible server (`vllm serve <checkpoint>`, `transformers serve`,
  llama.cpp's `llama-server`), on `/completions` or, with `api: chat`, `/chat/completions`;
  one request per prompt with `n=k`, or k single-choice requests per prompt on a server that
  does not honour `n` (found once per server, see `OpenAIGenerator`); at most `concurrency`
  in flight. Timeouts, retries (which statuses and errors, backoff with jitter, Retry-After)
  and the API key header come from `online.http`, configured by `max_retries`,
  `retry_backoff_s`, `timeout_s`, `api_key_env`; what a good reply is, from `online.replies`.
  A request that fails for good, or a malformed reply (not JSON, an HTML page, the wrong
  `object`, no `choices`, a choice without text) that persists through the retries, raises
  `GenerationError` naming the endpoint (redacted) and what was wrong. Nothing is returned
  for a partly failed call, so a cycle stops before anything reaches the buffer.
- `vllm`: in-process `vllm.LLM` on a GPU (optional extra `tether[vllm]`).

Prompts are tokenised without special tokens, as `offline.tokenize` does for training: the
prompt text already carries any chat template, so generation continues exactly the text the
trainer scores. Sampling is plain ancestral sampling (top-k off) shaped only by `temperature`
and `top_p`, so with temperature 1 and top_p 1 the samples are draws from the policy itself,
which the KL estimate in `online.kl` relies on (it shares `sample_ids` below).
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, Protocol

import httpx
import torch

from offline.secrets import redact_url
from offline.seeds import derive_seed
from online.config import GenerationConfig
from online.http import RequestFailed, RetryPolicy, auth_headers, post_json
from online.prompts import Prompt
from online.replies import chat_texts, completion_texts
from online.types import Generation

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """Generation failed for good (server error after retries, malformed reply, missing backend)."""


class Generator(Protocol):
    """Anything that samples k responses per prompt from one policy version."""

    def generate(self, prompts: Sequence[Prompt], k: int, seed: int) -> list[Generation]: ...


def build_generator(
    cfg: GenerationConfig,
    model_dir: str | Path | None,
    policy_version: str,
    model=None,
    tokenizer=None,
) -> Generator:
    """The configured backend for the checkpoint at `model_dir` (hf may reuse `model`+`tokenizer`)."""
    if cfg.backend == "hf":
        if model is None or tokenizer is None:
            if model_dir is None:
                raise ValueError("the hf backend needs model_dir or an already-loaded model and tokenizer")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_dir)
        return HFGenerator(model, tokenizer, cfg, policy_version)
    if cfg.backend == "openai":
        name = cfg.model or (str(model_dir) if model_dir is not None else None)
        if name is None:
            raise ValueError("the openai backend needs generation.model or model_dir (the served model name)")
        if cfg.token_ids_prompt and tokenizer is None and model_dir is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return OpenAIGenerator(cfg, name, policy_version, tokenizer=tokenizer)
    if model_dir is None:
        raise ValueError("the vllm backend needs model_dir (a checkpoint directory)")
    return VLLMGenerator(cfg, model_dir, policy_version)


# ----------------------------------------------------------------------------- hf backend


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids without special tokens (the text already carries any template)."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    for text, row in zip(prompts, ids):
        if not row:
            raise ValueError(f"prompt {text!r:.60} tokenises to nothing: cannot generate from it")
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T): left-padded so every prompt ends at column T-1."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def sample_ids(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    k: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    batch_size: int = 16,
) -> list[list[list[int]]]:
    """k responses' token ids per prompt ([prompt][sample][token]), each cut after its first EOS.

    The EOS is kept when sampled (stopping is part of the sampled sequence; a response without
    one hit `max_new_tokens`). Seeded on a forked RNG, so the caller's RNG state is untouched;
    the same (prompts, batch_size, seed) gives the same samples.
    """
    from transformers import GenerationConfig as HFGenerationConfig

    device = next(model.parameters()).device
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    # Unset fields would be filled from the checkpoint's generation_config.json and then from
    # transformers' defaults (top_k=50!), so every other warper is set to its neutral value:
    # the samples must follow the policy's own distribution, shaped only by temperature/top_p.
    gen_cfg = HFGenerationConfig(
        do_sample=do_sample,
        top_k=0,
        min_p=0.0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=k if do_sample else 1,  # greedy: one answer, copied k times below
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **sampling,
    )
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompt_ids), batch_size):
                rows = prompt_ids[start : start + batch_size]
                input_ids, mask = left_pad(rows, pad_id)  # (B, T)
                seqs = model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
                )  # (B*k, T + new) sampling, row b*k + j is sample j of prompt b; (B, T + new) greedy
                new = seqs[:, input_ids.shape[1] :].tolist()
                per_prompt = k if do_sample else 1
                for b in range(len(rows)):
                    out.append([_cut_at_eos(new[b * per_prompt + j % per_prompt], eos_id) for j in range(k)])
    finally:
        model.train(was_training)
    return out


def _cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


class HFGenerator:
    """transformers `generate`, batched and left-padded, on whatever device the model is on."""

    def __init__(self, model, tokenizer, cfg: GenerationConfig, policy_version: str, do_sample: bool = True):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token: generation could never stop")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.policy_version = policy_version
        self.do_sample = do_sample  # False: greedy (evaluation, tests); k copies of one answer
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id

    def generate(self, prompts: Sequence[Prompt], k: int, seed: int) -> list[Generation]:
        if not prompts:
            return []
        samples = sample_ids(
            self.model,
            encode_prompts(self.tokenizer, [p for p, _ in prompts]),
            k=k,
            max_new_tokens=self.cfg.max_new_tokens,
            eos_id=self.tokenizer.eos_token_id,
            pad_id=self.pad_id,
            seed=seed,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            do_sample=self.do_sample,
            batch_size=self.cfg.batch_size,
        )
        return [
            Generation(
                prompt=prompt,
                category=category,
                responses=tuple(self.tokenizer.decode(r, skip_special_tokens=True) for r in rs),
                policy_version=self.policy_version,
            )
            for (prompt, category), rs in zip(prompts, samples)
        ]


# ------------------------------------------------------------------------- openai backend


# A 4xx whose message names `n` (or "choice"): the server refuses several choices per request.
_NAMES_N = re.compile(r"(?<![\w/.-])[`'\"]?n[`'\"]?(?![\w/.-])|\bchoices?\b", re.IGNORECASE)


class OpenAIGenerator:
    """An OpenAI-compatible server (`vllm serve`, `transformers serve`, llama.cpp's `llama-server`).

    Payloads are built only here, at the edge. `api: completions` posts the prompt text (or,
    with `token_ids_prompt`, its token ids) to `{base_url}/completions`; `api: chat` posts it
    as one user message to `{base_url}/chat/completions`. Why one user message holding the
    prompt text: a `Prompt` is the text the trainer scores, already rendered (with
    `prompts.chat_template`, the template is in it) and the raw question is not kept beside it;
    so chat mode is allowed only with `prompts.chat_template: false` (`OnlineConfig` refuses
    the pair), where the text *is* the user's question and the server adds its own template.
    Samples are then drawn under the server's template while the trainer scores the bare
    prompt: use completions where the server has them.

    `n`: one request per prompt asks for `n=k` choices. A server that answers fewer (vLLM
    honours `n`; `transformers serve` ignores it) or refuses `n` with a 4xx that names it
    (llama.cpp's server) is remembered as single-choice, per (base_url, model, api) for the
    life of the process, and logged once; from then on each prompt's k samples are k requests
    without `n`, sample j of prompt i seeded `derive_seed(seed, i, j)`. Replies from before
    the switch are discarded, so a prompt's samples never depend on when the switch happened.
    """

    # (base_url, model, api) of servers that answer one choice per request, found this process.
    _single_choice: ClassVar[set[tuple[str, str, str]]] = set()
    _single_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, cfg: GenerationConfig, model_name: str, policy_version: str, tokenizer=None):
        self.cfg, self.model_name, self.policy_version = cfg, model_name, policy_version
        base = str(cfg.base_url).rstrip("/")
        self.url = f"{base}/chat/completions" if cfg.api == "chat" else f"{base}/completions"
        self._server = (base, model_name, cfg.api)
        if cfg.token_ids_prompt and tokenizer is None:
            raise ValueError("generation.token_ids_prompt needs the policy's tokenizer (or model_dir to load it)")
        self.tokenizer = tokenizer
        # Backoff cap and Retry-After cap: the helper's defaults (30 s, 120 s).
        self.policy = RetryPolicy(
            max_retries=cfg.max_retries, backoff_base_s=cfg.retry_backoff_s, timeout_s=cfg.timeout_s
        )
        self._rng = random.Random()  # backoff jitter only: samples are seeded per request
        self._parse = chat_texts if cfg.api == "chat" else completion_texts

    def __repr__(self) -> str:  # never show headers (the API key)
        return f"OpenAIGenerator(url={redact_url(self.url)!r}, model={self.model_name!r})"

    @property
    def single_choice(self) -> bool:
        """True once this server was found to answer one choice per request (this process)."""
        return self._server in self._single_choice

    def generate(self, prompts: Sequence[Prompt], k: int, seed: int) -> list[Generation]:
        if not prompts:
            return []
        inputs = (
            encode_prompts(self.tokenizer, [p for p, _ in prompts])
            if self.cfg.token_ids_prompt else [p for p, _ in prompts]
        )
        with (
            httpx.Client(headers=auth_headers(self.cfg.api_key_env)) as client,
            ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool,
        ):
            def batch(i: int) -> tuple[str, ...] | None:
                return None if self.single_choice else self._n_choices(client, inputs[i], k, derive_seed(seed, i))

            texts = list(pool.map(batch, range(len(prompts))))
            todo = [(i, j) for i, t in enumerate(texts) if t is None for j in range(k)]

            def single(ij: tuple[int, int]) -> str:
                i, j = ij
                return self._one_choice(client, inputs[i], derive_seed(seed, i, j))

            by_prompt: dict[int, list[str]] = {}
            for (i, _), text in zip(todo, pool.map(single, todo)):
                by_prompt.setdefault(i, []).append(text)
        for i, samples in by_prompt.items():
            texts[i] = tuple(samples)
        return [
            Generation(prompt=p, category=c, responses=r, policy_version=self.policy_version)
            for (p, c), r in zip(prompts, texts)
        ]

    def _payload(self, prompt: str | list[int], seed: int, n: int | None) -> dict:
        body: dict = dict(self.cfg.extra_body)
        body["model"] = self.model_name
        if self.cfg.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if n is not None:
            body["n"] = n
        body.update(
            temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_new_tokens, seed=seed
        )
        return body

    def _post(self, client: httpx.Client, payload: dict) -> tuple[str, ...]:
        return post_json(client, self.url, payload, self.policy, rng=self._rng, parse=self._parse)

    def _n_choices(self, client: httpx.Client, prompt: str | list[int], k: int, seed: int) -> tuple[str, ...] | None:
        """k texts from one `n=k` request; None when the server turned out to be single-choice."""
        try:
            texts = self._post(client, self._payload(prompt, seed, k))
        except RequestFailed as exc:
            if exc.status in (400, 422) and _NAMES_N.search(exc.detail):
                self._remember_single_choice(f"refused n={k} (HTTP {exc.status}: {exc.detail})")
                return None
            raise GenerationError(self._explain(exc)) from None
        if len(texts) < k:
            self._remember_single_choice(f"answered n={k} with {len(texts)} choice{'s' * (len(texts) != 1)}")
            return None
        if len(texts) > k:
            raise GenerationError(f"{redact_url(self.url)}: asked for n={k} completions, got {len(texts)}")
        return texts

    def _one_choice(self, client: httpx.Client, prompt: str | list[int], seed: int) -> str:
        try:
            texts = self._post(client, self._payload(prompt, seed, None))
        except RequestFailed as exc:
            raise GenerationError(self._explain(exc)) from None
        if len(texts) != 1:
            raise GenerationError(f"{redact_url(self.url)}: asked for one completion, got {len(texts)}")
        return texts[0]

    def _remember_single_choice(self, what: str) -> None:
        with self._single_lock:
            if self._server in self._single_choice:
                return
            self._single_choice.add(self._server)
        log.warning(
            "%s (model %r) %s: sending each prompt's samples as single-choice requests, each with its "
            "own derived seed, from now on (for this server, this process)",
            redact_url(self.url), self.model_name, what,
        )

    def _explain(self, exc: RequestFailed) -> str:
        """The failure, plus what to change where the status says the configuration is wrong."""
        hint = ""
        if exc.status == 404 and self.cfg.api == "completions":
            hint = "; does the server have /completions? set generation.api: chat if it has only /chat/completions"
        elif exc.status in (400, 422) and self.cfg.token_ids_prompt:
            hint = "; the server may not take token ids as a prompt (generation.token_ids_prompt is vLLM's)"
        elif exc.status in (400, 404) and "model" in exc.detail.lower():
            hint = f"; set generation.model to the name the server serves (sent {self.model_name!r})"
        return f"{exc}{hint}"


# --------------------------------------------------------------------------- vllm backend


class VLLMGenerator:
    """In-process `vllm.LLM` on a GPU. Optional extra `tether[vllm]`.

    Not exercised in CI (no GPU, vllm not installed): kept deliberately small, and its test is
    skipped unless vllm and CUDA are both present. Prompts go in as token ids (encoded like the
    hf backend, no special tokens) so both backends continue exactly the same text.
    """

    def __init__(self, cfg: GenerationConfig, model_dir: str | Path, policy_version: str):
        try:
            import vllm
        except ImportError:
            raise GenerationError(
                "generation.backend 'vllm' needs the vllm package: install `tether[vllm]` on a GPU machine"
            ) from None
        if not torch.cuda.is_available():
            raise GenerationError(
                "generation.backend 'vllm' needs a CUDA GPU: run it on a GPU machine with `tether[vllm]`"
            )
        self.cfg, self.policy_version, self._vllm = cfg, policy_version, vllm
        self.llm = vllm.LLM(
            model=str(model_dir),
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            max_model_len=cfg.vllm_max_model_len,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[Prompt], k: int, seed: int) -> list[Generation]:
        if not prompts:
            return []
        ids = encode_prompts(self.tokenizer, [p for p, _ in prompts])
        params = [
            self._vllm.SamplingParams(
                n=k,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                seed=derive_seed(seed, i),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=False)
        return [
            Generation(
                prompt=p,
                category=c,
                responses=tuple(o.text for o in out.outputs),
                policy_version=self.policy_version,
            )
            for (p, c), out in zip(prompts, outputs)
        ]
