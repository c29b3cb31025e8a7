"""Prompt pool and generation: MT-Bench as a real pool, a tiny in-process Llama for the hf
backend, a real loopback HTTP server for the openai backend; vllm only where it can run."""

import copy
import email.utils
import json
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from fake_openai_server import FakeOpenAIServer
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from offline.seeds import derive_seed
from online.config import GenerationConfig, OnlineConfig, PromptPoolConfig
from online.generate import (
    GenerationError,
    HFGenerator,
    OpenAIGenerator,
    build_generator,
    sample_ids,
)
from online.prompts import (
    PromptError,
    is_heldout,
    load_prompt_pool,
    read_prompt_file,
    sample_prompts,
)

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt-bench" / "question.jsonl"
needs_mt_bench = pytest.mark.skipif(not MT_BENCH.exists(), reason=f"real data not found at {MT_BENCH} (../shared beside the checkout)")
WORDS = ["<pad>", "<eos>", "<unk>"] + "a b c d e f g h the cat dog sat ran on mat".split()
EOS = 1


def tiny_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    out.chat_template = chat_template
    return out


def tiny_model(seed: int = 0, hidden: int = 16, heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
        eos_token_id=EOS, pad_token_id=0, bos_token_id=None, attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


PROMPTS = [("the cat sat on", "animals"), ("a", None), ("b c d e f g h", "letters"), ("dog ran", "animals")]


# ----------------------------------------------------------------------------- prompt pool


@needs_mt_bench
def test_mt_bench_pool_uses_first_turns_and_a_hash_split():
    raw = read_prompt_file(MT_BENCH)
    assert len(raw) == 80 and len({c for _, c in raw}) == 8
    first = json.loads(MT_BENCH.read_text().splitlines()[0])
    assert raw[0] == (first["turns"][0], first["category"])

    pool = load_prompt_pool(PromptPoolConfig(path=MT_BENCH, heldout_fraction=0.25))
    assert len(pool.train) + len(pool.heldout) == 80
    assert 5 <= len(pool.heldout) <= 35  # ~20 expected
    assert all(is_heldout(p, 0.25) for p, _ in pool.heldout)
    assert not any(is_heldout(p, 0.25) for p, _ in pool.train)
    assert pool == load_prompt_pool(PromptPoolConfig(path=MT_BENCH, heldout_fraction=0.25))
    assert len(pool.categories) == 8


@needs_mt_bench
def test_heldout_categories_are_held_out_whole():
    cfg = PromptPoolConfig(path=MT_BENCH, heldout_fraction=0.0, heldout_categories=("math",))
    pool = load_prompt_pool(cfg)
    assert sum(c == "math" for _, c in pool.heldout) == 10 == len(pool.heldout)
    assert all(c != "math" for _, c in pool.train) and len(pool.train) == 70


@needs_mt_bench
def test_sample_prompts_seeded_balanced_and_beyond_pool_size():
    pool = load_prompt_pool(PromptPoolConfig(path=MT_BENCH, heldout_fraction=0.0)).train
    a = sample_prompts(pool, 20, seed=1)
    assert a == sample_prompts(pool, 20, seed=1) and a != sample_prompts(pool, 20, seed=2)
    assert len(set(a)) == 20  # without replacement while the pool lasts
    assert len(sample_prompts(pool, 200, seed=0)) == 200
    # Balanced over a lopsided pool: 3 categories, one with 1 prompt, one with 30.
    lopsided = [(f"m{i}", "math") for i in range(30)] + [("w0", "writing")]
    lopsided += [(f"s{i}", None) for i in range(5)]
    drawn = sample_prompts(lopsided, 9, seed=3, balanced=True)
    counts = {c: sum(x == c for _, x in drawn) for c in ("math", "writing", None)}
    assert counts == {"math": 3, "writing": 3, None: 3}
    assert {c for _, c in drawn[:3]} == {"math", "writing", None}  # interleaved
    assert len(sample_prompts(lopsided, 10, seed=3, balanced=True)) == 10
    assert sample_prompts([], 0, seed=0) == []
    with pytest.raises(ValueError, match="empty"):
        sample_prompts([], 3, seed=0)


@pytest.mark.parametrize(
    "line, where",
    [
        ("{not json", "bad.jsonl:2: not valid JSON"),
        ('["a list"]', "bad.jsonl:2: expected a JSON object"),
        ('{"text": "x"}', "bad.jsonl:2: field 'prompt' missing"),
        ('{"prompt": ""}', "bad.jsonl:2: field 'prompt' expected a non-empty string"),
        ('{"turns": []}', "bad.jsonl:2: field 'turns' expected a non-empty list"),
        ('{"turns": [3]}', "bad.jsonl:2: field 'turns[0]'"),
        ('{"prompt": "x", "category": 7}', "bad.jsonl:2: field 'category' expected a string"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, where):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine", "category": "c"}\n' + line + "\n")
    with pytest.raises(PromptError) as err:
        read_prompt_file(path)
    assert where in str(err.value) and err.value.line == 2


def test_prompt_function_source_and_config_checks(monkeypatch, tmp_path):
    module = types.ModuleType("fake_prompt_source")
    module.good = lambda: [("the cat", "animals"), "a b"]
    module.bad = lambda: [("ok", None), ("x", 3)]
    monkeypatch.setitem(sys.modules, "fake_prompt_source", module)
    pool = load_prompt_pool(PromptPoolConfig(function="fake_prompt_source:good", heldout_fraction=0.0))
    assert pool.train == (("the cat", "animals"), ("a b", None))
    with pytest.raises(PromptError, match="item 1"):
        load_prompt_pool(PromptPoolConfig(function="fake_prompt_source:bad"))
    with pytest.raises(PromptError, match="cannot import"):
        load_prompt_pool(PromptPoolConfig(function="fake_prompt_source:missing"))
    with pytest.raises(ValidationError, match="exactly one"):
        PromptPoolConfig(path=MT_BENCH, function="fake_prompt_source:good")
    with pytest.raises(ValidationError, match="exactly one"):
        PromptPoolConfig()
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptError, match="no prompts"):
        load_prompt_pool(PromptPoolConfig(path=tmp_path / "empty.jsonl"))


def test_chat_template_renders_a_user_turn(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "the cat"}\n')
    template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} <assistant>{% endif %}"
    )
    cfg = PromptPoolConfig(path=path, chat_template=True, heldout_fraction=0.0)
    assert load_prompt_pool(cfg, tiny_tokenizer(template)).train == (("<user> the cat <assistant>", None),)
    with pytest.raises(ValueError, match="no chat template"):
        load_prompt_pool(cfg, tiny_tokenizer())


# ------------------------------------------------------------------------------ hf backend


def test_hf_returns_k_stripped_samples_per_prompt_in_order(model, tokenizer):
    cfg = GenerationConfig(k=3, max_new_tokens=5, batch_size=3)
    gen = build_generator(cfg, None, "v1", model=model, tokenizer=tokenizer)
    out = gen.generate(PROMPTS, k=3, seed=0)
    assert [(g.prompt, g.category) for g in out] == PROMPTS
    for g in out:
        assert g.policy_version == "v1" and len(g.responses) == 3
        assert all(len(r.split()) <= 5 for r in g.responses)  # new tokens only
    assert len({r for g in out for r in g.responses}) > 3  # actually sampled


def test_hf_is_seeded_and_leaves_the_global_rng_alone(model, tokenizer):
    gen = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=6, batch_size=2), "v1")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = gen.generate(PROMPTS, k=4, seed=7)
    assert torch.rand(1) == before
    assert a == gen.generate(PROMPTS, k=4, seed=7)
    assert a != gen.generate(PROMPTS, k=4, seed=8)


def test_hf_samples_ignore_the_checkpoints_own_sampling_defaults(model, tokenizer):
    """A generation_config.json with top_k/min_p must not truncate the policy's distribution."""
    opinionated = copy.deepcopy(model)
    opinionated.generation_config.top_k = 1
    opinionated.generation_config.min_p = 0.5
    opinionated.generation_config.repetition_penalty = 2.0
    cfg = GenerationConfig(max_new_tokens=6)
    plain = HFGenerator(model, tokenizer, cfg, "v").generate(PROMPTS, k=3, seed=4)
    assert HFGenerator(opinionated, tokenizer, cfg, "v").generate(PROMPTS, k=3, seed=4) == plain


def test_hf_left_padded_batch_equals_one_at_a_time_greedy(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=8, batch_size=len(PROMPTS))
    batched = HFGenerator(model, tokenizer, cfg, "v1", do_sample=False).generate(PROMPTS, k=2, seed=0)
    single_cfg = cfg.model_copy(update={"batch_size": 1})
    single = HFGenerator(model, tokenizer, single_cfg, "v1", do_sample=False).generate(PROMPTS, k=2, seed=0)
    assert batched == single
    assert all(g.responses[0] == g.responses[1] for g in batched)  # greedy: k identical copies


def test_hf_stops_at_eos_and_keeps_it_in_the_ids(model, tokenizer):
    eager = copy.deepcopy(model)
    head = torch.nn.Linear(eager.config.hidden_size, len(WORDS), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-20.0)
        head.bias[EOS] = 20.0  # EOS is (almost) certain at every step
    eager.lm_head = head
    ids = sample_ids(eager, [[3, 4], [5]], k=2, max_new_tokens=6, eos_id=EOS, pad_id=0, seed=0)
    assert ids == [[[EOS], [EOS]], [[EOS], [EOS]]]
    gen = HFGenerator(eager, tokenizer, GenerationConfig(max_new_tokens=6), "v1")
    out = gen.generate(PROMPTS[:2], k=2, seed=0)
    assert [g.responses for g in out] == [("", ""), ("", "")]


def test_build_hf_generator_from_a_checkpoint_dir(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = GenerationConfig(max_new_tokens=4)
    loaded = build_generator(cfg, tmp_path, "v2").generate(PROMPTS[:2], k=2, seed=5)
    in_memory = build_generator(cfg, None, "v2", model=model, tokenizer=tokenizer)
    assert loaded == in_memory.generate(PROMPTS[:2], k=2, seed=5)
    with pytest.raises(ValueError, match="model_dir"):
        build_generator(cfg, None, "v2")


# -------------------------------------------------------------------------- openai backend


class _Completions(BaseHTTPRequestHandler):
    """Answers POST /completions and /chat/completions; behaviour per test is set on the server.

    Each text is "<prompt>|<seed>|<choice index>" (chat: the user message for the prompt).
    `short`: answer n - short choices (at least one); `ignore_n`: always one (as `transformers serve`);
    `refuse_n`: a 400 naming the choices for any n other than 1 (as llama.cpp's server).
    """

    def do_POST(self):  # noqa: N802 (stdlib name)
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append((self.path, body, self.headers.get("Authorization")))
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
            status = srv.statuses.pop(0) if srv.statuses else 200
        time.sleep(srv.delay)
        with srv.lock:
            srv.inflight -= 1
        if status != 200:
            self._send(status, {"error": "try later"}, {"Retry-After": "0"})
            return
        asked = body.get("n", 1)
        if srv.refuse_n and asked != 1:
            self._send(400, {"error": {"message": "Only one completion choice is allowed"}})
            return
        n = 1 if srv.ignore_n else max(1, asked - srv.short)
        chat = self.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        texts = {j: f"{prompt}|{body['seed']}|{j}" for j in reversed(range(n))}
        if chat:
            choices = [{"index": j, "message": {"role": "assistant", "content": t}} for j, t in texts.items()]
        else:
            choices = [{"index": j, "text": t} for j, t in texts.items()]
        self._send(200, {"choices": choices})

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    srv.daemon_threads = True
    srv.handle_error = lambda request, address: None  # a client that timed out closes early
    srv.lock, srv.requests, srv.statuses = threading.Lock(), [], []
    srv.inflight = srv.max_inflight = srv.short = 0
    srv.ignore_n = srv.refuse_n = False
    srv.delay = 0.0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


def openai_cfg(server, **kw) -> GenerationConfig:
    return GenerationConfig(backend="openai", base_url=server.url, retry_backoff_s=0.0, **kw)


def test_openai_sends_the_payload_and_returns_k_in_order(server, monkeypatch):
    monkeypatch.setenv("TETHER_GENERATION_API_KEY", "sk-secret")
    cfg = openai_cfg(server, temperature=0.7, top_p=0.9, max_new_tokens=12)
    gen = build_generator(cfg, "/ckpt/step-3", "v3")
    out = gen.generate(PROMPTS, k=3, seed=11)
    assert [(g.prompt, g.category, g.policy_version) for g in out] == [(p, c, "v3") for p, c in PROMPTS]
    for g in out:
        assert [r.split("|")[2] for r in g.responses] == ["0", "1", "2"]  # sorted by index
    path, body, auth = server.requests[0]
    assert path == "/v1/completions" and auth == "Bearer sk-secret"
    assert {k: body[k] for k in ("model", "n", "temperature", "top_p", "max_tokens")} == {
        "model": "/ckpt/step-3", "n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 12,
    }
    seeds = {b["seed"] for _, b, _ in server.requests}
    assert len(seeds) == len(PROMPTS)  # one distinct seed per prompt
    assert gen.generate(PROMPTS[:1], k=3, seed=11) == out[:1]  # same seed, same request
    assert "sk-secret" not in repr(gen)


def test_openai_bounded_concurrency(server):
    server.delay = 0.05
    prompts = [(f"p{i}", None) for i in range(10)]
    gen = build_generator(openai_cfg(server, concurrency=3, model="m"), None, "v")
    out = gen.generate(prompts, k=2, seed=0)
    assert len(out) == 10 and 1 < server.max_inflight <= 3


def test_openai_retries_transient_errors_then_succeeds(server):
    server.statuses = [503, 429]
    gen = build_generator(openai_cfg(server, model="m", max_retries=2), None, "v")
    out = gen.generate(PROMPTS[:1], k=2, seed=0)
    assert len(out[0].responses) == 2 and len(server.requests) == 3


def test_openai_gives_up_after_max_retries_and_fails_fast_on_400(server, monkeypatch):
    monkeypatch.setenv("TETHER_GENERATION_API_KEY", "sk-secret")
    server.statuses = [500] * 5
    gen = build_generator(openai_cfg(server, model="m", max_retries=2), None, "v")
    with pytest.raises(GenerationError, match="HTTP 500 after 3 tries") as err:
        gen.generate(PROMPTS[:1], k=2, seed=0)
    assert "sk-secret" not in str(err.value) and len(server.requests) == 3
    server.statuses, server.requests = [400], []
    with pytest.raises(GenerationError, match="HTTP 400"):
        gen.generate(PROMPTS[:1], k=2, seed=0)
    assert len(server.requests) == 1


def test_openai_timeout_and_short_reply_are_clear_errors(server):
    server.delay = 0.5
    gen = build_generator(openai_cfg(server, model="m", max_retries=0, timeout_s=0.1), None, "v")
    with pytest.raises(GenerationError, match="Timeout"):
        gen.generate(PROMPTS[:1], k=2, seed=0)
    server.delay, server.short = 0.0, -1  # one choice too many: a server bug, never silently cut
    with pytest.raises(GenerationError, match="asked for n=2 completions, got 3"):
        build_generator(openai_cfg(server, model="m"), None, "v").generate(PROMPTS[:1], k=2, seed=0)


@pytest.mark.parametrize("how", ["ignore_n", "short", "refuse_n"])
def test_openai_falls_back_to_single_choice_requests_once_per_server(server, caplog, how):
    """A server answering fewer than n choices (transformers serve) or refusing n with a 400
    (llama.cpp) gets k single-choice requests per prompt, each with its own derived seed; the
    switch is found once per server and logged once, and later generators skip the n=k try."""
    setattr(server, how, 1 if how == "short" else True)
    cfg = openai_cfg(server, model="m", concurrency=1)
    gen = build_generator(cfg, None, "v")
    with caplog.at_level("WARNING", logger="online.generate"):
        out = gen.generate(PROMPTS, k=3, seed=11)
        again = build_generator(cfg, None, "v").generate(PROMPTS, k=3, seed=11)
    assert again == out and gen.single_choice
    for i, g in enumerate(out):
        assert g.responses == tuple(f"{PROMPTS[i][0]}|{derive_seed(11, i, j)}|0" for j in range(3))
    assert len({r for g in out for r in g.responses}) == 3 * len(PROMPTS)  # distinct seeds, distinct samples
    warnings = [r.getMessage() for r in caplog.records if "single-choice" in r.getMessage()]
    assert len(warnings) == 1 and server.url in warnings[0], warnings
    wanted = {"ignore_n": "answered n=3 with 1 choice", "short": "answered n=3 with 2 choices",
              "refuse_n": "refused n=3 (HTTP 400: 'Only one completion choice is allowed')"}[how]
    assert wanted in warnings[0]
    # concurrency 1: one n=3 try (the first prompt's), then only single requests without `n`.
    with_n = [b for _, b, _ in server.requests if "n" in b]
    assert [b["n"] for b in with_n] == [3]
    assert len(server.requests) == 1 + 2 * 3 * len(PROMPTS)


def test_openai_chat_api_sends_the_prompt_as_one_user_message(server):
    cfg = openai_cfg(server, model="m", api="chat", extra_body={"top_k": -1, "repetition_penalty": 1.0})
    gen = build_generator(cfg, None, "v")
    out = gen.generate(PROMPTS[:2], k=2, seed=3)
    assert [g.responses for g in out] == [
        tuple(f"{p}|{derive_seed(3, i)}|{j}" for j in range(2)) for i, (p, _) in enumerate(PROMPTS[:2])
    ]
    path, body, _ = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": PROMPTS[0][0]}] and "prompt" not in body
    assert (body["top_k"], body["repetition_penalty"], body["n"]) == (-1, 1.0, 2)


def test_openai_token_ids_prompt_sends_the_policy_tokenizers_ids(server, tokenizer):
    cfg = openai_cfg(server, model="m", token_ids_prompt=True)
    out = build_generator(cfg, None, "v", tokenizer=tokenizer).generate(PROMPTS[:1], k=2, seed=0)
    ids = tokenizer(PROMPTS[0][0], add_special_tokens=False)["input_ids"]
    assert server.requests[0][1]["prompt"] == ids == [WORDS.index(w) for w in PROMPTS[0][0].split()]
    assert out[0].responses[0].startswith(str(ids))
    with pytest.raises(ValueError, match="tokenizer"):
        build_generator(cfg, None, "v")  # no tokenizer, no model_dir to load one from


def test_generation_api_settings_are_checked():
    with pytest.raises(ValidationError, match="token_ids_prompt needs generation.api 'completions'"):
        GenerationConfig(backend="openai", base_url="http://x/v1", api="chat", token_ids_prompt=True)
    with pytest.raises(ValidationError, match=r"extra_body may not set \['n', 'seed'\]"):
        GenerationConfig(backend="openai", base_url="http://x/v1", extra_body={"seed": 1, "n": 2, "top_k": 3})
    base = {"prompts": {"function": "m:f", "chat_template": True}, "judge": {"kind": "rule", "rule": {"function": "m:f"}}}
    with pytest.raises(ValidationError, match="templated twice"):
        OnlineConfig(**base, generation={"backend": "openai", "base_url": "http://x/v1", "api": "chat"})
    OnlineConfig(**base, generation={"backend": "openai", "base_url": "http://x/v1"})  # completions: fine


# The fault-injecting fake OpenAI server (tests/fake_openai_server.py): the generator's retries
# go through online.http, so they follow the same rules as the judge's.


def test_openai_honours_an_http_date_retry_after_and_retries_a_503():
    with FakeOpenAIServer() as fake:
        fake.retry_after = email.utils.formatdate(time.time() + 3, usegmt=True)  # whole seconds: 2-3 s away
        fake.script("503")
        cfg = GenerationConfig(backend="openai", base_url=fake.base_url, model="m", retry_backoff_s=0.0, max_retries=2)
        out = build_generator(cfg, None, "v").generate([("the cat", None)], k=2, seed=0)
        assert out[0].responses == ("the cat #0", "the cat #1")
        first, second = fake.requests
        assert (first.status, second.status, first.key) == (503, 200, second.key)
        # Server-side arrival times: the re-send waited for the date, not the zero backoff.
        assert 1.5 <= second.t - first.t < 4.0


def test_openai_gives_up_on_a_retry_after_over_the_cap_and_on_html_pages():
    with FakeOpenAIServer(retry_after="3600") as fake:
        cfg = GenerationConfig(backend="openai", base_url=fake.base_url, model="m", retry_backoff_s=0.0, max_retries=2)
        gen = build_generator(cfg, None, "v")
        fake.script("429")
        started = time.monotonic()
        with pytest.raises(GenerationError, match="HTTP 429: 'rate limited'; Retry-After over the 120 s cap"):
            gen.generate(PROMPTS[:1], k=2, seed=0)
        assert fake.n_requests == 1 and time.monotonic() - started < 1.0  # no hour-long sleep
        fake.script("malformed", "malformed", "malformed")
        with pytest.raises(GenerationError) as err:
            gen.generate(PROMPTS[:1], k=2, seed=0)
        assert str(err.value) == (
            f"{fake.base_url}/completions: HTTP 200 reply is not JSON after 3 tries: an HTML page ('upstream hiccup')"
        )


@pytest.mark.parametrize("fault, what", [
    ("wrong_object", "HTTP 200 reply does not have the expected shape after 2 tries: ReplyError: "
                     "`object` is 'list', expected 'text_completion': is base_url the right server and API?"),
    ("missing_choices", "ReplyError: no `choices` in the reply (the server says: 'upstream model overloaded')"),
    ("no_choices", "ReplyError: `choices` is empty"),
    ("malformed", "HTTP 200 reply is not JSON after 2 tries: an HTML page ('upstream hiccup')"),
    ("truncated", "HTTP 200 reply is not JSON after 2 tries: '{\"id\": \"cmpl-1\", \"object\""),
    ("html_502", "HTTP 502 after 2 tries: an HTML page ('502 Bad Gateway')"),
])
def test_openai_bad_replies_name_the_redacted_endpoint_and_what_was_wrong(fault, what):
    with FakeOpenAIServer() as fake:
        url = fake.base_url.replace("http://", "http://tether:pw-5ecr3t@")  # basic auth in the URL
        cfg = GenerationConfig(backend="openai", base_url=url, model="m", retry_backoff_s=0.0, max_retries=1)
        fake.script(fault, fault)
        with pytest.raises(GenerationError) as err:
            build_generator(cfg, None, "v").generate(PROMPTS[:1], k=2, seed=0)
        message = str(err.value)
        assert message.startswith(fake.base_url.replace("http://", "http://tether:***@") + "/completions: ")
        assert what in message and "pw-5ecr3t" not in message, message
        assert fake.n_requests == 2  # retried once (a proxy hiccup may pass), then given up


def test_openai_a_chat_reply_on_the_completions_endpoint_is_named():
    """A proxy routing /completions to a chat model: `object` says so, nothing is taken from it."""
    reply = {"object": "chat.completion", "choices": [{"index": 0, "message": {"content": "hi"}}]}
    from online.replies import ReplyError, chat_texts, completion_texts

    with pytest.raises(ReplyError, match="`object` is 'chat.completion', expected 'text_completion'"):
        completion_texts(reply)
    assert chat_texts(reply) == ("hi",)
    with pytest.raises(ReplyError, match="choice 0 has no `text` string"):
        completion_texts({"choices": [{"index": 0}]})
    with pytest.raises(ReplyError, match="the body is a JSON list"):
        completion_texts([])


def test_generation_config_checks():
    with pytest.raises(ValidationError, match="base_url"):
        GenerationConfig(backend="openai")
    with pytest.raises(ValidationError):
        GenerationConfig(k=1)
    with pytest.raises(ValidationError):
        GenerationConfig(temperature=0.0)
    with pytest.raises(ValidationError):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ValueError, match="served model name"):
        build_generator(GenerationConfig(backend="openai", base_url="http://x/v1"), None, "v")
    served = build_generator(GenerationConfig(backend="openai", base_url="http://x/v1"), "/c", "v")
    assert isinstance(served, OpenAIGenerator) and served.model_name == "/c"


# ---------------------------------------------------------------------------- vllm backend


def _vllm_runnable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_vllm_runnable(), reason="vllm and CUDA present: the real test runs instead")
def test_vllm_without_gpu_or_package_says_what_to_install(tmp_path):
    with pytest.raises(GenerationError, match=r"tether\[vllm\]"):
        build_generator(GenerationConfig(backend="vllm"), tmp_path, "v")


def test_vllm_memory_share_is_bounded():
    """vLLM beside the policy in one process: its memory share must leave room (<= 0.95)."""
    assert GenerationConfig().vllm_gpu_memory_utilization == 0.3
    for bad in (0.0, 0.99, 1.5):
        with pytest.raises(ValidationError, match="vllm_gpu_memory_utilization"):
            GenerationConfig(backend="vllm", vllm_gpu_memory_utilization=bad)
    with pytest.raises(ValidationError, match="vllm_max_model_len"):
        GenerationConfig(backend="vllm", vllm_max_model_len=0)


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_runnable(), reason="needs vllm (tether[vllm]) and a CUDA GPU")
def test_vllm_generates_k_samples_per_prompt(tmp_path):
    tiny_model(hidden=128, heads=2).save_pretrained(tmp_path)  # head_dim 64: supported by vllm kernels
    tiny_tokenizer().save_pretrained(tmp_path)
    gen = build_generator(GenerationConfig(backend="vllm", max_new_tokens=5), tmp_path, "v")
    out = gen.generate(PROMPTS, k=3, seed=0)
    assert [(g.prompt, g.category) for g in out] == PROMPTS
    assert all(len(g.responses) == 3 for g in out)
    assert out == gen.generate(PROMPTS, k=3, seed=0)
