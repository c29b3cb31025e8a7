"""Bad input: every kind of malformed dataset, config, prompt or buffer record fails clearly and writes nothing.

One parametrised table. Each case feeds one malformed input to a real entry point
(`load_config`, `load_preference_dataset`, `load_prompt_pool`, `ReplayBuffer.connect`/`.add`,
or the `tether` CLI through typer's CliRunner) and returns the error text; the test checks
the message names what to fix (file, line, field) and that nothing was written: no
checkpoint, pointer, resume or redis dir in the state dir, and no key in Redis. CLI cases also
check exit code 2 and an `error:` line instead of a traceback.
"""

from __future__ import annotations

import gzip
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from _tokenizers import byte_tokenizer
from pydantic import ValidationError
from typer.testing import CliRunner

from buffer.config import BufferConfig
from buffer.records import BufferedPair, InvalidRecord
from buffer.server import LocalRedis, resp_command
from buffer.connection import BufferUnavailable
from buffer.store import ReplayBuffer
from offline.data import DataError, load_preference_dataset
from offline.config import DataConfig
from offline.pairs import PreferencePair
from online.prompts import PromptError, load_prompt_pool
from online.config import PromptPoolConfig
from orchestrator.cli import app
from orchestrator.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
GOOD = {"prompt": "copy : 1 2 3 =", "chosen": "1 2 3", "rejected": "1 2 4"}
PLANTED_PW = "redis-planted-PW-8d1e"


@dataclass
class Ctx:
    """A case's sandbox: a tmp dir, the state dir configs point at, the session Redis (emptied)."""

    tmp: Path
    state: Path
    redis_url: str
    tokenizer_dir: Path
    monkeypatch: pytest.MonkeyPatch

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def jsonl(self, name: str, *records: Any) -> Path:
        return self.file(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))

    def config(self, *, drop: tuple[str, ...] = (), **changes: Any) -> Path:
        """The demo config aimed at this sandbox, with dotted-key changes (and top-level keys dropped)."""
        cfg = json.loads(json.dumps(DEMO))
        cfg.update(state_dir=str(self.state), buffer={"url": self.redis_url})
        cfg["model"]["name_or_path"] = str(self.tokenizer_dir)
        for key, value in changes.items():
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        for key in drop:
            cfg.pop(key)
        return self.file("config.yaml", yaml.safe_dump(cfg))

    def buffer(self, **kw: Any) -> ReplayBuffer:
        return ReplayBuffer.connect(BufferConfig(url=self.redis_url, **kw))

    def cli(self, *args: str) -> str:
        result = CliRunner().invoke(app, list(args))
        out = result.output
        assert "Traceback" not in out, out
        assert result.exit_code == 2, f"exit code {result.exit_code}: {result.exception!r}\n{out}"
        first = next(line for line in out.splitlines() if line.strip())
        assert first.startswith(("error:", "Usage:")), out
        return out


def raised(exc_type: type[BaseException], fn: Callable[[], Any]) -> str:
    with pytest.raises(exc_type) as info:
        fn()
    return str(info.value)


def data(ctx: Ctx, path: Path | str, tokenizer: Any = None, **kw: Any) -> str:
    return raised(DataError, lambda: load_preference_dataset(DataConfig(path=str(path), **kw), tokenizer))


def chat_data(ctx: Ctx, path: Path | str, **kw: Any) -> str:
    """Conversational records: loaded with a chat tokenizer, so the record's own error shows."""
    return data(ctx, path, tokenizer=byte_tokenizer(), **kw)


def msg(role: str, content: str) -> dict[str, str]:
    return {"content": content, "role": role}


UF = {  # shaped like HuggingFaceH4/ultrafeedback_binarized
    "prompt": "Name a prime.", "prompt_id": "ab12",
    "chosen": [msg("user", "Name a prime."), msg("assistant", "7.")],
    "rejected": [msg("user", "Name a prime."), msg("assistant", "9.")],
    "messages": [msg("user", "Name a prime."), msg("assistant", "7.")],
    "score_chosen": 8.0, "score_rejected": 3.0,
}
CONV = {k: UF[k] for k in ("chosen", "rejected", "score_chosen", "score_rejected")}  # trl-lib's


def prompts(ctx: Ctx, exc: type[BaseException] = PromptError, tokenizer: Any = None, **kw: Any) -> str:
    return raised(exc, lambda: load_prompt_pool(PromptPoolConfig(**kw), tokenizer=tokenizer))


def config(ctx: Ctx, exc: type[BaseException] = ConfigError, **changes: Any) -> str:
    return raised(exc, lambda: load_config(ctx.config(**changes)))


def fresh(**changes: Any) -> dict[str, Any]:
    """A fresh buffer record as JSON-ready data, with changes."""
    rec = BufferedPair.fresh(PreferencePair(**GOOD), cycle=1, judge="rule:x", confidence=0.5).model_dump(mode="json")
    for key, value in changes.items():
        node = rec
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return rec


def add(ctx: Ctx, *records: Any) -> str:
    buf = ctx.buffer()
    try:
        return raised(InvalidRecord, lambda: buf.add(list(records)))
    finally:
        buf.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES: list[Any] = []


def case(case_id: str, *fragments: str, marks: Any = ()) -> Callable:
    """Register a case: `fn(ctx) -> error text`, which must contain every fragment."""

    def register(fn: Callable[[Ctx], str]) -> Callable[[Ctx], str]:
        CASES.append(pytest.param(fn, fragments, id=case_id, marks=marks))
        return fn

    return register


# -- configs: orchestrator.config.load_config ---------------------------------------------------

case("config/missing-file", "nope.yaml: config file not found")(
    lambda c: raised(ConfigError, lambda: load_config(c.tmp / "nope.yaml")))
case("config/broken-yaml", "config.yaml: not valid YAML")(
    lambda c: raised(ConfigError, lambda: load_config(c.file("config.yaml", "model: [unclosed\n"))))
case("config/invalid-utf8", "config.yaml: not valid YAML", "can't decode byte 0xff")(
    lambda c: raised(ConfigError, lambda: load_config(c.file("config.yaml", b"name: caf\xff\n"))))
case("config/empty-file", "config.yaml: the file is empty")(
    lambda c: raised(ConfigError, lambda: load_config(c.file("config.yaml", "\n"))))
case("config/not-a-mapping", "expected a mapping at the top level, got list")(
    lambda c: raised(ConfigError, lambda: load_config(c.file("config.yaml", "- 1\n- 2\n"))))
case("config/unknown-key", "trian: Extra inputs are not permitted")(lambda c: config(c, trian={"epochs": 1}))
case("config/unknown-nested-key", "train.loss.bta: Extra inputs are not permitted")(
    lambda c: config(c, **{"train.loss.bta": 0.1}))
case("config/negative-beta", "train.loss.beta: Input should be greater than 0")(
    lambda c: config(c, **{"train.loss.beta": -0.1}))
case("config/kl-budget-zero", "online.controller.kl_budget: Input should be greater than 0")(
    lambda c: config(c, **{"online.controller.kl_budget": 0}))
case("config/judge-cost-budget-zero", "online.judge.max_cost_usd: Input should be greater than 0")(
    lambda c: config(c, **{"online.judge.max_cost_usd": 0}))
case("config/train-pairs-negative", "online.train_pairs: Input should be greater than 0")(
    lambda c: config(c, **{"online.train_pairs": -5}))
case("config/wrong-type", "train.batch_size: Input should be a valid integer")(
    lambda c: config(c, **{"train.batch_size": "thirty-two"}))
case("config/missing-section", "data: Field required")(
    lambda c: raised(ConfigError, lambda: load_config(c.config(drop=("data",)))))
case("config/empty-name", "name: String should have at least 1 character")(lambda c: config(c, name=""))
case("config/heldout-fraction-out-of-range", "data.heldout_fraction: Input should be less than 1")(
    lambda c: config(c, **{"data.heldout_fraction": 1.5}))
case("config/prompt-longer-than-sequence", "data: Value error, max_prompt_length (64) must be below max_length (32)")(
    lambda c: config(c, **{"data.max_prompt_length": 64}))
case("config/llm-judge-without-section", "the `llm` section is missing")(
    lambda c: config(c, **{"online.judge.kind": "llm"}))
case("config/judge-url-not-http", "online.judge.llm.base_url: String should match pattern")(
    lambda c: config(c, **{"online.judge.kind": "llm", "online.judge.llm": {"base_url": "ftp://judge", "model": "m"}}))
case("config/buffer-url-scheme", "buffer.url must start with redis:// or rediss://")(
    lambda c: config(c, **{"buffer.url": "http://127.0.0.1:6379"}))


@case("config/password-in-buffer-url", "buffer.url redis://:***@127.0.0.1:6379/0 embeds a password")
def _password_in_url(c: Ctx) -> str:
    text = config(c, ConfigError, **{"buffer.url": f"redis://:{PLANTED_PW}@127.0.0.1:6379/0"})
    assert PLANTED_PW not in text
    return text


@case("config/env-override-negative-beta", "train.loss.beta: Input should be greater than 0")
def _env_override(c: Ctx) -> str:
    c.monkeypatch.setenv("TETHER_TRAIN__LOSS__BETA", "-0.5")
    return config(c)


# -- datasets: offline.data.load_preference_dataset ----------------------------------------------

case("data/missing-file", "gone.jsonl: no such file")(lambda c: data(c, c.tmp / "gone.jsonl"))
case("data/empty-file", "empty.jsonl: no records: the source is empty")(lambda c: data(c, c.file("empty.jsonl", "\n\n")))
case("data/broken-json", "bad.jsonl:2: malformed JSON")(
    lambda c: data(c, c.jsonl("bad.jsonl", GOOD, '{"prompt": "x", "chosen": ')))
case("data/invalid-utf8", "bad.jsonl:2: invalid UTF-8 at byte 12")(
    lambda c: data(c, c.file("bad.jsonl", json.dumps(GOOD).encode() + b'\n{"prompt": "\xff\xfe"}\n')))
case("data/not-an-object", "bad.jsonl:1: expected a JSON object, got list")(
    lambda c: data(c, c.jsonl("bad.jsonl", [GOOD])))
case("data/wrong-type", "bad.jsonl:2: field 'chosen': expected a non-empty string, got int")(
    lambda c: data(c, c.jsonl("bad.jsonl", GOOD, {**GOOD, "chosen": 7})))
case("data/missing-field", "bad.jsonl:1: field 'rejected': missing")(
    lambda c: data(c, c.jsonl("bad.jsonl", {"prompt": "p", "chosen": "c"})))
case("data/empty-string", "bad.jsonl:1: field 'prompt': expected a non-empty string, got an empty string")(
    lambda c: data(c, c.jsonl("bad.jsonl", {**GOOD, "prompt": ""})))
case("data/chosen-equals-rejected", "bad.jsonl:3: field 'rejected': identical to 'chosen'")(
    lambda c: data(c, c.jsonl("bad.jsonl", GOOD, {**GOOD, "prompt": "q2"}, {**GOOD, "rejected": GOOD["chosen"]})))
case("data/unknown-layout", "bad.jsonl:1: unknown column layout: found columns ['answer', 'question']")(
    lambda c: data(c, c.jsonl("bad.jsonl", {"question": "q", "answer": "a"})))
case("data/unsupported-file-type", "pairs.csv: unsupported file type")(
    lambda c: data(c, c.file("pairs.csv", "prompt,chosen,rejected\n")))
case("data/category-wrong-type", "bad.jsonl:1: field 'category': expected a string or null, got int")(
    lambda c: data(c, c.jsonl("bad.jsonl", {**GOOD, "category": 3})))
case("data/id-wrong-type", "bad.jsonl:1: field 'id': expected a string, int or null, got list")(
    lambda c: data(c, c.jsonl("bad.jsonl", {**GOOD, "id": ["a"]})))
case("data/hh-no-common-prefix", "bad.jsonl:1: field 'rejected': shares no prefix")(
    lambda c: data(c, c.jsonl("bad.jsonl", {"chosen": "\n\nHuman: a\n\nAssistant: x",
                                            "rejected": "\n\nHuman: b\n\nAssistant: y"})))
case("data/truncated-gzip", "bad.jsonl.gz: cannot read the file after line")(
    lambda c: data(c, c.file("bad.jsonl.gz", gzip.compress((json.dumps(GOOD) + "\n").encode() * 200)[:-40])))
case("data/hub-while-offline", "hf:org/pairs: cannot read a hub dataset while offline")(
    lambda c: data(c, "hf:org/pairs"))
case("data/chat-without-tokenizer", "chat.jsonl: chat-shaped records", "pass the policy's tokenizer")(
    lambda c: data(c, c.jsonl("chat.jsonl", {"prompt": [{"role": "user", "content": "hi"}],
                                             "chosen": "a", "rejected": "b"})))
case("data/whitespace-only-prompt", "bad.jsonl:1: field 'prompt': expected a non-empty string, got only whitespace")(
    lambda c: data(c, c.jsonl("bad.jsonl", {**GOOD, "prompt": " \n\t "})))
case("data/responses-differ-only-in-whitespace", "bad.jsonl:2: field 'rejected': differs from 'chosen' only in whitespace")(
    lambda c: data(c, c.jsonl("bad.jsonl", GOOD, {**GOOD, "rejected": " " + GOOD["chosen"] + "\n"})))
case("data/implicit-no-common-prefix", "bad.jsonl:2: field 'rejected': shares no prefix with 'chosen'")(
    lambda c: data(c, c.jsonl("bad.jsonl", {"chosen": "The sky is blue.", "rejected": "The sky is grey."},
                              {"chosen": "Yes, it is.", "rejected": "No."})))
case("data/conversation-without-assistant-turn", "bad.jsonl:2: field 'chosen': the conversation has no assistant turn")(
    lambda c: chat_data(c, c.jsonl("bad.jsonl", CONV, {**CONV, "chosen": [msg("user", "Name a prime.")]})))
case("data/conversations-no-common-prefix", "bad.jsonl:1: field 'rejected': shares no leading message with 'chosen'")(
    lambda c: chat_data(c, c.jsonl("bad.jsonl", {**CONV, "rejected": [msg("user", "Other?"), msg("assistant", "9.")]})))
case("data/conversation-ends-with-user-turn", "bad.jsonl:1: field 'rejected[2].role': expected the conversation to end with an assistant turn")(
    lambda c: chat_data(c, c.jsonl("bad.jsonl", {**CONV, "rejected": CONV["rejected"] + [msg("user", "ok?")]})))
case("data/ultrafeedback-prompt-disagrees", "bad.jsonl:2: field 'prompt': 'Name an even prime.' is not a user turn",
     "chosen[0].content is 'Name a prime.'")(
    lambda c: chat_data(c, c.jsonl("bad.jsonl", UF, {**UF, "prompt": "Name an even prime."})))
case("data/score-not-a-number", "bad.jsonl:1: field 'score_chosen': expected a finite number or null, got str")(
    lambda c: chat_data(c, c.jsonl("bad.jsonl", {**UF, "score_chosen": "8.0"})))
case("data/score-without-its-partner", "bad.jsonl:1: field 'score_rejected': missing")(
    lambda c: data(c, c.jsonl("bad.jsonl", {**GOOD, "score_chosen": 2})))
case("data/margin-filter-without-scores", "bad.jsonl:1: field 'score_chosen': missing (data.min_score_margin is set")(
    lambda c: data(c, c.jsonl("bad.jsonl", GOOD), min_score_margin=1.0))
case(
    "data/duplicate-ids", "dup.jsonl:2: field 'id'", "duplicate",
)(lambda c: data(c, c.jsonl("dup.jsonl", {**GOOD, "id": "x1"}, {**GOOD, "prompt": "other", "id": "x1"})))


# -- prompts: online.prompts.load_prompt_pool ---------------------------------------------------

case("prompts/missing-file", "nope.jsonl: prompt file not found")(lambda c: prompts(c, path=c.tmp / "nope.jsonl"))
case("prompts/broken-json", "p.jsonl:2: not valid JSON")(
    lambda c: prompts(c, path=c.jsonl("p.jsonl", {"prompt": "a"}, '{"prompt": ')))
case("prompts/empty-prompt", "p.jsonl:1: field 'prompt' expected a non-empty string")(
    lambda c: prompts(c, path=c.jsonl("p.jsonl", {"prompt": "   "})))
case("prompts/wrong-type", "p.jsonl:2: field 'category' expected a string, got int")(
    lambda c: prompts(c, path=c.jsonl("p.jsonl", {"prompt": "a"}, {"prompt": "b", "category": 5})))
case("prompts/missing-field", "p.jsonl:1: field 'prompt' missing: expected 'prompt' or MT-Bench 'turns'")(
    lambda c: prompts(c, path=c.jsonl("p.jsonl", {"text": "a"})))
case("prompts/empty-turns", "p.jsonl:1: field 'turns' expected a non-empty list of strings")(
    lambda c: prompts(c, path=c.jsonl("p.jsonl", {"turns": []})))
case("prompts/empty-file", "p.jsonl: no prompts found")(lambda c: prompts(c, path=c.file("p.jsonl", "\n")))
case("prompts/function-not-importable", "nope_mod:fn: cannot import the prompt function")(
    lambda c: prompts(c, function="nope_mod:fn"))


@case("prompts/function-bad-items",
      "bad_prompt_source:pool: field 'item 1' expected (prompt: str, category: str | None[, heldout: bool]), got 42")
def _bad_function(c: Ctx) -> str:
    c.file("bad_prompt_source.py", "def pool():\n    return [('fine', None), 42]\n")
    c.monkeypatch.syspath_prepend(str(c.tmp))
    return prompts(c, function="bad_prompt_source:pool")



case("prompts/two-sources", "set exactly one of `path` (a JSONL file) or `function`")(
    lambda c: raised(ValidationError, lambda: PromptPoolConfig(path=c.tmp / "p.jsonl", function="a:b")))
case("prompts/chat-template-missing", "prompts.chat_template is set but the tokenizer has no chat template")(
    lambda c: prompts(c, ValueError, tokenizer=byte_tokenizer(chat_template=None),
                      path=c.jsonl("p.jsonl", {"prompt": "a"}), chat_template=True))
case(
    "prompts/invalid-utf8", "p.jsonl:2:", "invalid UTF-8",
)(lambda c: prompts(c, path=c.file("p.jsonl", b'{"prompt": "a"}\n{"prompt": "\xff"}\n')))


# -- the replay buffer: ReplayBuffer.connect / .add ----------------------------------------------


@case("buffer/unreachable-url", "is unreachable", "start one with `redis-server")
def _unreachable(c: Ctx) -> str:
    cfg = BufferConfig(url=f"redis://127.0.0.1:{closed_port()}/0", connect_retries=0)
    return raised(BufferUnavailable, lambda: ReplayBuffer.connect(cfg))


@case("buffer/wrong-password", "refused the credentials", "set $TETHER_REDIS_PASSWORD")
def _wrong_password(c: Ctx) -> str:
    c.monkeypatch.setenv("TETHER_REDIS_PASSWORD", PLANTED_PW)
    with LocalRedis(c.tmp / "redis-auth", password="the-right-one") as server:
        text = raised(BufferUnavailable, lambda: ReplayBuffer.connect(BufferConfig(url=server.url, connect_retries=0)))
    assert PLANTED_PW not in text and "the-right-one" not in text
    return text


case("buffer/no-url", "no Redis URL: set buffer.url")(
    lambda c: raised(ValueError, lambda: ReplayBuffer.connect(BufferConfig())))
case("buffer/cycle-as-string", "record 0: cycle: Input should be a valid integer")(lambda c: add(c, fresh(cycle="3")))
case("buffer/confidence-out-of-range", "record 0: confidence: Input should be less than or equal to 1")(
    lambda c: add(c, fresh(confidence=1.5)))
case("buffer/confidence-nan", "record 0: confidence: Input should be a finite number")(
    lambda c: add(c, fresh(confidence=float("nan"))))
case("buffer/missing-field", "record 0: pair.rejected: Field required")(lambda c: add(c, fresh(**{"pair.rejected": ...})))
case("buffer/empty-prompt", "record 0: pair.prompt: String should have at least 1 character")(
    lambda c: add(c, fresh(**{"pair.prompt": ""})))
case("buffer/unknown-field", "record 0: score: Extra inputs are not permitted")(lambda c: add(c, {**fresh(), "score": 1}))
case("buffer/fresh-without-cycle", "record 0: <record>: Value error, a fresh pair needs its cycle index")(
    lambda c: add(c, fresh(cycle=None)))
case("buffer/anchor-through-add", "record 0: anchor pairs enter through seed_anchor()")(
    lambda c: add(c, BufferedPair.anchor(PreferencePair(**GOOD), "fp")))
case("buffer/not-a-record", "record 0: expected a BufferedPair or a mapping, got str")(lambda c: add(c, "pair"))
case("buffer/one-bad-record-among-good", "record 2: pool: Input should be 'anchor' or 'fresh'")(
    lambda c: add(c, fresh(), fresh(**{"pair.prompt": "q2"}), fresh(pool="stale")))
case(
    "buffer/chosen-equals-rejected", "record 0", "identical",
)(lambda c: add(c, fresh(**{"pair.rejected": GOOD["chosen"]})))


@case(
    "judge/unreachable-url", "127.0.0.1", "unreachable",
)
def _judge_unreachable(c: Ctx) -> str:
    from online.judge import LLMJudge
    from online.config import LLMJudgeConfig
    from online.types import Generation

    cfg = LLMJudgeConfig(base_url=f"http://127.0.0.1:{closed_port()}/v1", model="m", max_retries=0)
    gens = [Generation(prompt="p", responses=("a", "b"), policy_version="v")]
    return raised(Exception, lambda: LLMJudge(cfg).judge_generations(gens))


# -- the CLI (exit code 2, an `error:` line, no traceback) ----------------------------------------

case("cli/broken-yaml", "error:", "config.yaml: not valid YAML")(
    lambda c: c.cli("cycle", "--config", str(c.file("config.yaml", "online: {judge: [\n"))))
case("cli/missing-config", "error:", "missing.yaml: config file not found")(
    lambda c: c.cli("offline", "--config", str(c.tmp / "missing.yaml")))
case("cli/negative-beta", "error:", "train.loss.beta: Input should be greater than 0")(
    lambda c: c.cli("cycle", "--config", str(c.config()), "--set", "train.loss.beta=-1"))
case("cli/judge-audit-no-pairs", "error:", "online.judge.audit.pairs: Input should be greater than 0")(
    lambda c: c.cli("judge", "audit", "--config", str(c.config()), "--set", "online.judge.audit.pairs=0"))
case("cli/judge-audit-threshold-out-of-range", "error:", "online.judge.audit.min_agreement: Input should be less than or equal to 1")(
    lambda c: c.cli("judge", "audit", "--config", str(c.config()), "--set", "online.judge.audit.min_agreement=1.5"))
case("cli/unknown-key", "error:", "online.judge.kindd: Extra inputs are not permitted")(
    lambda c: c.cli("cycle", "--config", str(c.config()), "--set", "online.judge.kindd=rule"))
case("cli/budget-zero", "error:", "online.controller.kl_budget: Input should be greater than 0")(
    lambda c: c.cli("demo", "--config", str(c.config()), "--set", "online.controller.kl_budget=0"))
case("cli/set-without-value", "--set expects section.field=value, got 'train.epochs'")(
    lambda c: c.cli("cycle", "--config", str(c.config()), "--set", "train.epochs"))
case("cli/data-inspect-broken-json", "error:", "bad.jsonl:2: malformed JSON")(
    lambda c: c.cli("data", "inspect", str(c.jsonl("bad.jsonl", GOOD, "{nope")), "--config", str(c.config())))
case("cli/data-inspect-missing-file", "error:", "gone.jsonl: no such file")(
    lambda c: c.cli("data", "inspect", str(c.tmp / "gone.jsonl"), "--config", str(c.config())))
case(
    "cli/password-in-buffer-url", "error:", "embeds a password",
)(lambda c: c.cli("cycle", "--config", str(c.config()), "--set", f"buffer.url=redis://:{PLANTED_PW}@127.0.0.1:1/0"))
case(
    "cli/buffer-unreachable", "error:", "is unreachable",
)(lambda c: c.cli("buffer", "stats", "--config", str(c.config(**{"buffer.url": f"redis://127.0.0.1:{closed_port()}/0",
                                                                 "buffer.connect_retries": 0}))))


# -- the test ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir with only a tokenizer and a config.json: enough for `tether data inspect`."""
    path = tmp_path_factory.mktemp("tokenizer")
    byte_tokenizer().save_pretrained(path)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def ctx(tmp_path: Path, redis_url: str, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    for key in [k for k in __import__("os").environ if k.startswith("TETHER_")]:
        monkeypatch.delenv(key)
    return Ctx(tmp_path, tmp_path / "state", redis_url, tokenizer_dir, monkeypatch)


def assert_wrote_nothing(c: Ctx) -> None:
    written = [p.name for p in (c.state.iterdir() if c.state.exists() else [])]
    assert not {"checkpoints", "pointers", "resume", "redis", "models", "cache"} & set(written), written
    port = int(c.redis_url.rsplit(":", 1)[1].split("/")[0])
    assert resp_command(port, "DBSIZE") == 0, "a Redis key was written"


def test_the_table_has_at_least_twenty_kinds_per_entry_point_family() -> None:
    families: dict[str, int] = {}
    for p in CASES:
        families[p.id.split("/")[0]] = families.get(p.id.split("/")[0], 0) + 1
    assert sum(families.values()) >= 20, families
    assert set(families) == {"config", "data", "prompts", "buffer", "judge", "cli"}, families


@pytest.mark.parametrize(("make_error", "fragments"), CASES)
def test_bad_input_fails_clearly_and_writes_nothing(
    ctx: Ctx, make_error: Callable[[Ctx], str], fragments: tuple[str, ...]
) -> None:
    message = " ".join(make_error(ctx).split())  # rich wraps long CLI lines
    for fragment in fragments:
        assert " ".join(fragment.split()) in message, f"{fragment!r} not in {message!r}"
    assert_wrote_nothing(ctx)


def test_a_huge_record_is_loaded_whole_and_truncated_only_when_tokenised(tmp_path: Path) -> None:
    """Not an error by design: no size cap at load; the shared truncation rule cuts it, and says so."""
    from offline.tokenize import tokenize_pairs

    huge = {**GOOD, "prompt": "copy : " + "1 " * 250_000 + "="}  # a 0.5 MB line
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps(huge) + "\n" + json.dumps({**GOOD, "prompt": "q2"}) + "\n")
    ds = load_preference_dataset(DataConfig(path=str(path), max_length=32, max_prompt_length=16))
    pair = next(p for p in ds.pairs if len(p.prompt) > 500_000)
    (tok,) = tokenize_pairs([pair], byte_tokenizer(), 32, 16)
    assert tok.truncated and len(tok.prompt_ids) == 16
