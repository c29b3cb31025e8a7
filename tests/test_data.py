"""offline/data.py: shapes, sources, bad input, dedupe, split and fingerprint, on tiny files."""

from __future__ import annotations

import gzip
import json
import random
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from _tokenizers import byte_tokenizer
from offline.config import DataConfig
from offline.data import (
    BAD_RECORD_REASONS,
    DataError,
    PreferenceDataset,
    dataset_fingerprint,
    load_pairs,
    load_preference_dataset,
    split_pairs,
    write_jsonl,
)
from offline.pairs import PreferencePair

EXPLICIT = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "category": "math", "id": "a1"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome", "id": 7},
    {"prompt": "Say hi", "chosen": "hi", "rejected": "no", "category": "chat", "extra": 1.5},
]

HH = [
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello there!",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.",
    },
    {   # multi-turn, and both responses start with the same word: the prompt still ends at
        # the last shared "\n\nAssistant:", not inside the shared " Sure".
        "chosen": "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: Sure, yes.",
        "rejected": "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: Sure, no.",
        "category": "harmless",
    },
]


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    """One JSON object (dict) or raw text (str) per line."""
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def texts(pairs) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected, p.category, p.source_id) for p in pairs]


EXPECTED_EXPLICIT = [
    ("What is 2+2?", "4", "5", "math", "a1"),
    ("Capital of France?", "Paris", "Rome", None, "7"),
    ("Say hi", "hi", "no", "chat", None),
]


# ---------------------------------------------------------------- shapes and sources


def test_explicit_jsonl_keeps_category_and_id(tmp_path):
    loaded = load_pairs(write_lines(tmp_path / "x.jsonl", EXPLICIT))
    assert loaded.format == "explicit"
    assert texts(loaded.pairs) == EXPECTED_EXPLICIT
    assert loaded.pairs[0].id == "a1" and loaded.pairs[2].id == loaded.pairs[2].content_id
    assert loaded.skipped == {} and loaded.duplicates == 0


def test_jsonl_gz_and_parquet_load_the_same_pairs(tmp_path):
    plain = load_pairs(write_lines(tmp_path / "x.jsonl", EXPLICIT))
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "x.jsonl").read_bytes()))
    records = [{k: v for k, v in r.items() if k != "extra"} for r in EXPLICIT]
    for r in records:  # Parquet needs one type per column
        r["id"] = None if r.get("id") is None else str(r["id"])
    parquet = write_parquet(tmp_path / "x.parquet", records)
    cfg = dict(heldout_fraction=0.5)
    fingerprints = {
        load_preference_dataset(DataConfig(path=str(p), **cfg)).fingerprint
        for p in (tmp_path / "x.jsonl", gz, parquet)
    }
    assert texts(load_pairs(gz).pairs) == texts(plain.pairs) == EXPECTED_EXPLICIT
    assert texts(load_pairs(parquet).pairs) == EXPECTED_EXPLICIT
    assert len(fingerprints) == 1


def test_hh_prompt_is_the_common_prefix_and_leading_space_is_kept(tmp_path):
    loaded = load_pairs(write_lines(tmp_path / "hh.jsonl", HH))
    assert loaded.format == "hh"
    first, second = loaded.pairs
    assert (first.prompt, first.chosen, first.rejected) == (
        "\n\nHuman: Hi\n\nAssistant:", " Hello there!", " Go away."
    )
    assert second.prompt == "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant:"
    assert (second.chosen, second.rejected) == (" Sure, yes.", " Sure, no.")
    assert second.category == "harmless"
    for pair, record in zip(loaded.pairs, HH):
        assert pair.prompt + pair.chosen == record["chosen"]
        assert pair.prompt + pair.rejected == record["rejected"]


def test_hh_dialogues_diverging_before_the_last_turn(tmp_path):
    """Rejected has an extra turn: the prompt ends at the last *shared* Assistant tag."""
    record = {
        "chosen": "\n\nHuman: Q\n\nAssistant: A",
        "rejected": "\n\nHuman: Q\n\nAssistant: A\n\nHuman: more\n\nAssistant: B",
    }
    (pair,) = load_pairs(write_lines(tmp_path / "hh.jsonl", [record])).pairs
    assert pair.prompt == "\n\nHuman: Q\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" A", " A\n\nHuman: more\n\nAssistant: B")


CHAT = [
    {   # response as one message dict
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": {"role": "assistant", "content": "Hello"},
        "rejected": {"role": "assistant", "content": "Bye"},
        "category": "greet",
        "id": "c1",
    },
    {   # responses as a string and as a list of messages
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": "4",
        "rejected": [{"role": "assistant", "content": "5"}, {"role": "user", "content": "ok"}],
    },
]


def test_chat_records_render_with_the_chat_template(tmp_path):
    tok = byte_tokenizer()
    loaded = load_pairs(write_lines(tmp_path / "chat.jsonl", CHAT), tokenizer=tok)
    assert loaded.format == "chat"
    first, second = loaded.pairs
    # Expected strings written out by hand from CHAT_TEMPLATE in tests/_tokenizers.py.
    assert first.prompt == "<|system|>Be brief.<|end|>\n<|user|>Hi<|end|>\n<|assistant|>"
    assert (first.chosen, first.rejected) == ("Hello<|end|>\n", "Bye<|end|>\n")
    assert (first.category, first.source_id) == ("greet", "c1")
    assert second.prompt == "<|user|>2+2?<|end|>\n<|assistant|>"
    assert second.chosen == "4<|end|>\n"
    assert second.rejected == "5<|end|>\n<|user|>ok<|end|>\n"
    # prompt + response == the template's render of the whole conversation
    whole = tok.apply_chat_template(
        CHAT[0]["prompt"] + [CHAT[0]["chosen"]], tokenize=False
    )
    assert first.prompt + first.chosen == whole


def test_chat_parquet_with_nested_messages(tmp_path):
    records = [
        {"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": j}]}
        for r, c, j in ((CHAT[0], "Hello", "Bye"), (CHAT[1], "4", "5"))
    ]
    path = write_parquet(tmp_path / "chat.parquet", records)
    loaded = load_pairs(path, tokenizer=byte_tokenizer())
    assert loaded.format == "chat"
    assert [(p.chosen, p.rejected) for p in loaded.pairs] == [
        ("Hello<|end|>\n", "Bye<|end|>\n"), ("4<|end|>\n", "5<|end|>\n")
    ]


def test_format_is_detected_per_file_and_can_be_forced(tmp_path):
    hh = write_lines(tmp_path / "hh.jsonl", HH)
    assert load_pairs(hh).format == "hh"
    with pytest.raises(DataError) as err:
        load_pairs(hh, format="explicit")
    assert str(err.value) == (
        f"{hh}:1: field 'prompt': missing (expected a non-empty string)"
    )
    # An explicit file forced to hh reads chosen/rejected as dialogues: no Assistant tag.
    explicit = write_lines(tmp_path / "x.jsonl", EXPLICIT)
    with pytest.raises(DataError, match=r"x\.jsonl:1: field 'rejected': shares no prefix"):
        load_pairs(explicit, format="hh")


def test_unknown_layout_names_the_columns_and_the_accepted_layouts(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    for mode in ("error", "skip"):  # a file-level problem: skipping cannot help
        with pytest.raises(DataError) as err:
            load_pairs(path, on_bad_record=mode)
        message = str(err.value)
        assert message.startswith(
            f"{path}:1: unknown column layout: found columns ['answer', 'question']"
        )
        layouts = ("explicit (prompt, chosen, rejected", "chat (prompt: list", "hh (chosen, rejected")
        for layout in layouts:
            assert layout in message
        assert err.value.reason == "unknown_layout"


# ---------------------------------------------------------------- bad input

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}
BAD_LINES = [
    # (line 2 of the file, reason, field, message after "<file>:2: ")
    ('{"prompt": "p", "chosen": ', "malformed_json", None,
     "malformed JSON: Expecting value (column 27)"),
    ("[1, 2]", "not_an_object", None, "expected a JSON object, got list"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "wrong_type", "chosen",
     "field 'chosen': expected a non-empty string, got int"),
    ({"prompt": "p", "chosen": "c"}, "missing_field", "rejected",
     "field 'rejected': missing (expected a non-empty string)"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "missing_field", "rejected",
     "field 'rejected': missing (expected a non-empty string)"),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, "empty_field", "prompt",
     "field 'prompt': expected a non-empty string, got an empty string"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_responses", "rejected",
     "field 'rejected': identical to 'chosen': no preference"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "category": 3}, "wrong_type", "category",
     "field 'category': expected a string or null, got int"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "id": [1]}, "wrong_type", "id",
     "field 'id': expected a string, int or null, got list"),
]


@pytest.mark.parametrize("bad, reason, field, message", BAD_LINES)
def test_bad_record_is_a_located_error_or_a_counted_skip(tmp_path, bad, reason, field, message):
    path = write_lines(tmp_path / "x.jsonl", [GOOD, bad, {**GOOD, "chosen": "c2"}])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value) == f"{path}:2: {message}"
    assert (err.value.file, err.value.line, err.value.field, err.value.reason) == (
        str(path), 2, field, reason
    )
    loaded = load_pairs(path, on_bad_record="skip")
    assert loaded.skipped == {reason: 1}
    assert [p.chosen for p in loaded.pairs] == ["c", "c2"]
    assert reason in BAD_RECORD_REASONS


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}\n'
    )
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid UTF-8 at byte 12$"):
        load_pairs(path)
    assert load_pairs(path, on_bad_record="skip").skipped == {"invalid_utf8": 1}


def test_hh_bad_records(tmp_path):
    no_prefix = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"}
    empty_response = {
        "chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: y"
    }
    identical = {"chosen": HH[0]["chosen"], "rejected": HH[0]["chosen"]}
    path = write_lines(tmp_path / "hh.jsonl", [HH[0], no_prefix, empty_response, identical, HH[1]])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value) == (
        f"{path}:2: field 'rejected': shares no prefix ending in '\\n\\nAssistant:' with "
        "'chosen', so there is no prompt"
    )
    with pytest.raises(DataError, match=r"hh2\.jsonl:3: field 'chosen': empty response after"):
        load_pairs(write_lines(tmp_path / "hh2.jsonl", [HH[0], HH[1], empty_response]))
    loaded = load_pairs(path, on_bad_record="skip")
    assert loaded.skipped == {"empty_field": 1, "identical_responses": 1, "no_common_prefix": 1}
    assert len(loaded.pairs) == 2


def test_chat_bad_records_name_the_message_field(tmp_path):
    tok = byte_tokenizer()
    good = CHAT[1]
    cases = [
        ({**good, "prompt": "not a list"}, "prompt", "wrong_type"),  # a str prompt in a chat file
        ({**good, "prompt": []}, "prompt", "empty_field"),
        ({**good, "prompt": [{"role": "user"}]}, "prompt[0].content", "missing_field"),
        ({**good, "prompt": [{"role": "user", "content": 5}]}, "prompt[0].content", "wrong_type"),
        ({**good, "chosen": {"role": "user", "content": "x"}}, "chosen[0].role", "wrong_role"),
        ({**good, "rejected": 4}, "rejected", "wrong_type"),
        ({**good, "rejected": "4"}, "rejected", "identical_responses"),
    ]
    for record, field, reason in cases:
        path = write_lines(tmp_path / "chat.jsonl", [CHAT[0], record])
        with pytest.raises(DataError) as err:
            load_pairs(path, tokenizer=tok)
        assert str(err.value).startswith(f"{path}:2: field '{field}': ")
        assert (err.value.reason, err.value.field) == (reason, field)
    path = write_lines(tmp_path / "chat.jsonl", [CHAT[0]] + [c[0] for c in cases])
    loaded = load_pairs(path, tokenizer=tok, on_bad_record="skip")
    assert loaded.skipped == {
        "empty_field": 1, "identical_responses": 1, "missing_field": 1, "wrong_role": 1, "wrong_type": 3
    }


def test_chat_without_tokenizer_or_template_is_a_clear_error(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", CHAT)
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as err:
            load_pairs(path, on_bad_record=mode)
        assert err.value.reason == "no_tokenizer"
        assert str(err.value).startswith(f"{path}: chat-shaped records")
        with pytest.raises(DataError) as err:
            load_pairs(path, tokenizer=byte_tokenizer(chat_template=None), on_bad_record=mode)
        assert err.value.reason == "no_chat_template"
        assert "has no chat_template" in str(err.value) and "tiny-byte" in str(err.value)


def test_chat_template_failures_are_record_errors(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", CHAT)
    # The generation prompt differs from how an assistant turn starts: no prefix relation.
    mismatched = byte_tokenizer(chat_template=(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[gen]{% endif %}"
    ))
    with pytest.raises(DataError, match=r"chat\.jsonl:1: field 'chosen': the chat template's render"):
        load_pairs(path, tokenizer=mismatched)
    strict = byte_tokenizer(chat_template=(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ))
    expected = r"chat\.jsonl:1: field 'prompt': the chat template failed: no system role"
    with pytest.raises(DataError, match=expected):
        load_pairs(path, tokenizer=strict)
    loaded = load_pairs(path, tokenizer=strict, on_bad_record="skip")
    assert loaded.skipped == {"template_error": 1} and len(loaded.pairs) == 1


def test_parquet_errors_name_the_row(tmp_path):
    records = [GOOD, {"prompt": "p", "chosen": "", "rejected": "r"}]
    path = write_parquet(tmp_path / "x.parquet", records)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value) == (
        f"{path}:row 1: field 'chosen': expected a non-empty string, got an empty string"
    )
    assert (err.value.row, err.value.line) == (1, None)


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_empty_file_is_always_an_error(tmp_path, content):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=r"x\.jsonl: no records: the source is empty$"):
            load_pairs(path, on_bad_record=mode)
    empty_parquet = tmp_path / "x.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty_parquet)
    with pytest.raises(DataError, match="no records"):
        load_pairs(empty_parquet)


def test_all_records_skipped_is_an_error(tmp_path):
    bad = [{**GOOD, "chosen": 1}, "oops", {**GOOD, "rejected": "c"}]
    path = write_lines(tmp_path / "x.jsonl", bad)
    with pytest.raises(DataError) as err:
        load_pairs(path, on_bad_record="skip")
    assert str(err.value) == (
        f"{path}: all 3 records were skipped "
        "(identical_responses: 1, malformed_json: 1, wrong_type: 1)"
    )


def test_missing_file_shows_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_pairs("data/x.jsonl")
    assert str(err.value).startswith("data/x.jsonl: no such file (looked for ")
    assert str(tmp_path / "data" / "x.jsonl") in str(err.value)
    # ... and a relative path that exists resolves against the current directory.
    (tmp_path / "data").mkdir()
    write_lines(tmp_path / "data" / "x.jsonl", EXPLICIT)
    assert load_pairs("data/x.jsonl").source == "data/x.jsonl"


def test_unreadable_and_unsupported_files(tmp_path):
    gz = tmp_path / "x.jsonl.gz"
    whole = gzip.compress(b"".join(json.dumps(GOOD).encode() + b"\n" for _ in range(50)))
    gz.write_bytes(whole[:40])  # truncated stream
    with pytest.raises(DataError) as err:
        load_pairs(gz)
    assert err.value.reason == "unreadable" and str(err.value).startswith(f"{gz}: cannot read")
    bad_parquet = tmp_path / "x.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"x\.parquet: cannot read the Parquet file"):
        load_pairs(bad_parquet)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    expected = r"x\.csv: unsupported file type; expected \.jsonl, \.jsonl\.gz, \.parquet$"
    with pytest.raises(DataError, match=expected):
        load_pairs(csv)


# ---------------------------------------------------------------- hub (never touches a hub)


def test_hub_is_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_pairs("hf:Anthropic/hh-rlhf")
    assert err.value.reason == "offline"
    assert str(err.value).startswith("hf:Anthropic/hh-rlhf: cannot read a hub dataset while offline")


def test_hub_records_are_normalised_with_row_positions(monkeypatch):
    """A stand-in `datasets` module: checks the call and the row numbering, not the network."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def load_dataset(hub_id, split):
        calls.append((hub_id, split))
        return [HH[0], {"chosen": 1, "rejected": "x"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    expected = r"^hf:org/set:row 1: field 'chosen': expected a non-empty string, got int$"
    with pytest.raises(DataError, match=expected):
        load_pairs("hf:org/set", hub_split="test")
    loaded = load_pairs("hf:org/set", hub_split="test", on_bad_record="skip")
    assert calls == [("org/set", "test")] * 2
    assert (loaded.source, loaded.format) == ("hf:org/set[test]", "hh")
    assert loaded.skipped == {"wrong_type": 1}


# ---------------------------------------------------------------- dedupe, limit, split, fingerprint


def many_pairs(n: int, tag: str = "") -> list[PreferencePair]:
    return [
        PreferencePair(prompt=f"q{i}{tag}", chosen=f"good {i}", rejected=f"bad {i}")
        for i in range(n)
    ]


def test_duplicates_are_dropped_and_counted_and_limit_counts_distinct_pairs(tmp_path):
    rows = [EXPLICIT[0], EXPLICIT[1], EXPLICIT[0], EXPLICIT[0], EXPLICIT[2]]
    path = write_lines(tmp_path / "x.jsonl", rows)
    loaded = load_pairs(path)
    assert texts(loaded.pairs) == EXPECTED_EXPLICIT and loaded.duplicates == 2
    limited = load_pairs(path, limit=2)
    assert texts(limited.pairs) == EXPECTED_EXPLICIT[:2] and limited.duplicates == 0


def test_split_is_deterministic_order_independent_and_seeded():
    pairs = many_pairs(2000)
    train, heldout = split_pairs(pairs, 0.1, seed=0)
    assert len(train) + len(heldout) == 2000
    assert {p.content_id for p in train}.isdisjoint(p.content_id for p in heldout)
    assert 140 <= len(heldout) <= 260  # ~Binomial(2000, 0.1): mean 200, sd 13.4
    assert split_pairs(pairs, 0.1, seed=0) == (train, heldout)
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    _, heldout_shuffled = split_pairs(shuffled, 0.1, seed=0)
    assert {p.content_id for p in heldout_shuffled} == {p.content_id for p in heldout}
    # Adding pairs never moves an existing pair to the other side.
    _, heldout_grown = split_pairs(pairs + many_pairs(500, "x"), 0.1, seed=0)
    assert {p.content_id for p in heldout} <= {p.content_id for p in heldout_grown}
    _, heldout_other_seed = split_pairs(pairs, 0.1, seed=1)
    assert {p.content_id for p in heldout_other_seed} != {p.content_id for p in heldout}
    train_ids = {p.content_id for p in train}
    assert list(train) == [p for p in pairs if p.content_id in train_ids]  # input order kept
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_pairs(pairs, 1.0, seed=0)


def test_split_never_leaves_a_side_empty_with_two_or_more_pairs():
    for seed in range(20):
        train, heldout = split_pairs(many_pairs(3), 0.01, seed)
        assert (len(train), len(heldout)) == (2, 1)
        train, heldout = split_pairs(many_pairs(3), 0.99, seed)
        assert (len(train), len(heldout)) == (1, 2)
    train, heldout = split_pairs(many_pairs(1), 0.5, 0)  # one pair: it goes where its key says
    assert train + heldout == tuple(many_pairs(1))


def test_fingerprint_is_stable_and_sensitive_to_content_split_and_format(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", EXPLICIT)
    cfg = DataConfig(path=str(path), heldout_fraction=0.5, split_seed=3)
    ds = load_preference_dataset(cfg)
    assert isinstance(ds, PreferenceDataset) and len(ds.fingerprint) == 64
    assert load_preference_dataset(cfg).fingerprint == ds.fingerprint
    # Pinned: a changed hashing scheme silently breaks every lineage record that names a dataset.
    assert dataset_fingerprint(many_pairs(2)[:1], many_pairs(2)[1:], "explicit") == (
        "4e2be44082169a6562c684e0d3b9f184fb3a0f2ae41d566fda0fdb8255bf4c2f"
    )
    def fingerprint(**changes) -> str:
        return load_preference_dataset(DataConfig(**{**cfg.model_dump(), **changes})).fingerprint

    # 3 pairs: some seeds give the same split; the fingerprint changes exactly when it differs.
    heldout = {p.content_id for p in ds.heldout}
    splits_seen = set()
    for seed in range(8):
        other = load_preference_dataset(DataConfig(**{**cfg.model_dump(), "split_seed": seed}))
        same_split = {p.content_id for p in other.heldout} == heldout
        assert (other.fingerprint == ds.fingerprint) == same_split
        splits_seen.add(other.fingerprint)
    assert len(splits_seen) > 1
    edited = [EXPLICIT[0], EXPLICIT[1], {**EXPLICIT[2], "chosen": "hi!"}]
    assert fingerprint(path=str(write_lines(tmp_path / "y.jsonl", edited))) != ds.fingerprint
    assert dataset_fingerprint(ds.train, ds.heldout, "hh") != ds.fingerprint
    # Category/id are provenance, not content: relabelling keeps the fingerprint.
    relabelled = [{**r, "category": "other"} for r in EXPLICIT]
    assert fingerprint(path=str(write_lines(tmp_path / "z.jsonl", relabelled))) == ds.fingerprint


def test_load_preference_dataset_reports_what_was_dropped(tmp_path):
    rows = [EXPLICIT[0], EXPLICIT[0], "{bad", EXPLICIT[1], EXPLICIT[2], {**GOOD, "rejected": "c"}]
    path = write_lines(tmp_path / "x.jsonl", rows)
    ds = load_preference_dataset(DataConfig(path=str(path), on_bad_record="skip"))
    assert (ds.duplicates, ds.skipped) == (1, {"identical_responses": 1, "malformed_json": 1})
    assert sorted(texts(ds.pairs)) == sorted(EXPECTED_EXPLICIT)
    assert (ds.source, ds.format) == (str(tmp_path / "x.jsonl"), "explicit")


# ---------------------------------------------------------------- config and writer


def test_config_constraints():
    assert DataConfig(path="x.jsonl").max_length == 512
    with pytest.raises(ValidationError, match="max_prompt_length .* must be below max_length"):
        DataConfig(path="x.jsonl", max_length=64, max_prompt_length=64)
    bad_fields = [
        {"heldout_fraction": 0.0}, {"heldout_fraction": 1.0}, {"max_length": 7}, {"limit": 0},
        {"format": "csv"}, {"on_bad_record": "ignore"}, {"typo": 1}, {"path": ""}, {"path": "hf:"},
    ]
    for bad in bad_fields:
        with pytest.raises(ValidationError):
            DataConfig(**{"path": "x.jsonl", **bad})
    assert all(f.description for f in DataConfig.model_fields.values())


def test_write_jsonl_round_trips_atomically(tmp_path):
    # \u2028 is a line break to str.splitlines but not to JSONL: it must survive the round trip.
    odd = PreferencePair(
        prompt="p\u2028q\n", chosen="é ☃", rejected="r", category="c", source_id="i"
    )
    pairs = [odd, *many_pairs(3)]
    for name in ("out/a.jsonl", "out/a.jsonl.gz"):
        path = write_jsonl(pairs, tmp_path / name)
        assert list(load_pairs(path).pairs) == pairs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jsonl", "a.jsonl.gz"]
    first = (tmp_path / "out/a.jsonl.gz").read_bytes()
    write_jsonl(pairs, tmp_path / "out/a.jsonl.gz")
    assert (tmp_path / "out/a.jsonl.gz").read_bytes() == first  # byte-identical rewrite
