"""offline/formats.py: every common preference-data shape, on records shaped exactly like the
Hub datasets' (written inline here; nothing is downloaded), scores and the margin filter, and
the whitespace rules.

Expected rendered strings follow `CHAT_TEMPLATE` in tests/_tokenizers.py: a message renders as
`<|role|>content<|end|>\\n`, the generation prompt as `<|assistant|>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _tokenizers import byte_tokenizer
from offline.config import DataConfig
from offline.data import DataError, load_pairs, load_preference_dataset, write_jsonl
from offline.formats import common_prefix_length, detect_format, implicit_prompt_end
from offline.pairs import PreferencePair


def user(text: str) -> dict:
    return {"content": text, "role": "user"}  # the Hub's Parquet struct order: content, role


def assistant(text: str) -> dict:
    return {"content": text, "role": "assistant"}


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rendered(messages: list[dict], generation_prompt: bool = False) -> str:
    text = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages)
    return text + ("<|assistant|>" if generation_prompt else "")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# HuggingFaceH4/ultrafeedback_binarized (train_prefs): prompt string, prompt_id, chosen/rejected
# whole conversations that repeat the prompt as the user turn, messages (= chosen), scores.
# The second record is a tie, as the real set has.
H4_ULTRAFEEDBACK = [
    {
        "prompt": "How can I build a habit of drawing every day?",
        "prompt_id": "086b3e24f29b8956a01059f79c56db35d118a06fb6b844b095737d042795cd43",
        "chosen": [user("How can I build a habit of drawing every day?"),
                   assistant("Start small: ten minutes after breakfast, in the same sketchbook.")],
        "rejected": [user("How can I build a habit of drawing every day?"),
                     assistant("As an AI I cannot draw, but habits are good.")],
        "messages": [user("How can I build a habit of drawing every day?"),
                     assistant("Start small: ten minutes after breakfast, in the same sketchbook.")],
        "score_chosen": 8.5,
        "score_rejected": 6.0,
    },
    {
        "prompt": "Name a prime number above 10.",
        "prompt_id": "2d41f36b0b5c8a8e3c7f1e0f1a9b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b",
        "chosen": [user("Name a prime number above 10."), assistant("11 is prime.")],
        "rejected": [user("Name a prime number above 10."), assistant("13 is a prime number.")],
        "messages": [user("Name a prime number above 10."), assistant("11 is prime.")],
        "score_chosen": 7.0,
        "score_rejected": 7.0,
    },
]

# trl-lib/ultrafeedback_binarized: the same conversations without `prompt` (conversational,
# implicit prompt), with the scores.
TRL_ULTRAFEEDBACK = [
    {k: r[k] for k in ("chosen", "rejected", "score_chosen", "score_rejected")}
    for r in H4_ULTRAFEEDBACK
]

# A multi-turn conversational set with an explicit prompt (TRL's conversational preference
# type: `prompt` a message list ending in the user turn, one assistant message each side) ...
MULTI_TURN_EXPLICIT = [
    {
        "prompt": [{"role": "system", "content": "You are terse."},
                   {"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "4."},
                   {"role": "user", "content": "And times 3?"}],
        "chosen": [{"role": "assistant", "content": "12."}],
        "rejected": [{"role": "assistant", "content": "It is 7."}],
    },
]
# ... and the same dialogue as whole conversations (trl-lib/hh-rlhf-helpful-base style).
MULTI_TURN_IMPLICIT = [
    {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
    for r in MULTI_TURN_EXPLICIT
]

# TRL's standard preference type, explicit and implicit prompt (the examples of TRL's doc).
STANDARD_EXPLICIT = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
STANDARD_IMPLICIT = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]


# ---------------------------------------------------------------- the shapes


def test_h4_ultrafeedback_binarized_loads_with_its_scores(tmp_path, tok):
    """Before: `field 'chosen': expected a non-empty string, got list`."""
    loaded = load_pairs(write_lines(tmp_path / "uf.jsonl", H4_ULTRAFEEDBACK), tokenizer=tok)
    assert loaded.format == "ultrafeedback" and loaded.skipped == {}
    first, tie = loaded.pairs
    assert first.prompt == "<|user|>How can I build a habit of drawing every day?<|end|>\n<|assistant|>"
    assert first.chosen == "Start small: ten minutes after breakfast, in the same sketchbook.<|end|>\n"
    assert first.rejected == "As an AI I cannot draw, but habits are good.<|end|>\n"
    # prompt + response == the chat template's render of the whole conversation
    for pair, rec in zip(loaded.pairs, H4_ULTRAFEEDBACK):
        for side in ("chosen", "rejected"):
            whole = tok.apply_chat_template(rec[side], tokenize=False)
            assert pair.prompt + getattr(pair, side) == whole == rendered(rec[side])
    assert (first.score_chosen, first.score_rejected, first.margin) == (8.5, 6.0, None)
    assert first.score_margin == 2.5
    assert (tie.score_margin, tie.source_id) == (0.0, None)  # prompt_id is not a record id


def test_trl_ultrafeedback_is_conversational_implicit_and_gives_the_same_pairs(tmp_path, tok):
    h4 = load_pairs(write_lines(tmp_path / "h4.jsonl", H4_ULTRAFEEDBACK), tokenizer=tok)
    trl = load_pairs(write_lines(tmp_path / "trl.jsonl", TRL_ULTRAFEEDBACK), tokenizer=tok)
    assert trl.format == "chat_implicit"
    assert trl.pairs == h4.pairs  # same texts, same scores, same content ids


def test_multi_turn_explicit_and_implicit_conversations_agree(tmp_path, tok):
    explicit = load_pairs(write_lines(tmp_path / "e.jsonl", MULTI_TURN_EXPLICIT), tokenizer=tok)
    implicit = load_pairs(write_lines(tmp_path / "i.jsonl", MULTI_TURN_IMPLICIT), tokenizer=tok)
    assert (explicit.format, implicit.format) == ("chat", "chat_implicit")
    (pair,) = implicit.pairs
    assert explicit.pairs == implicit.pairs
    assert pair.prompt == (
        "<|system|>You are terse.<|end|>\n<|user|>What is 2+2?<|end|>\n<|assistant|>4.<|end|>\n"
        "<|user|>And times 3?<|end|>\n<|assistant|>"
    )
    assert (pair.chosen, pair.rejected) == ("12.<|end|>\n", "It is 7.<|end|>\n")
    rec = MULTI_TURN_IMPLICIT[0]
    assert pair.prompt + pair.rejected == tok.apply_chat_template(rec["rejected"], tokenize=False)


def test_conversational_prompt_is_what_trls_extract_prompt_finds(tok):
    """Parity with TRL's own implicit-prompt extraction for conversations."""
    from trl.data_utils import extract_prompt

    from offline.formats import split_conversations

    for rec in TRL_ULTRAFEEDBACK + MULTI_TURN_IMPLICIT:
        theirs = extract_prompt({"chosen": rec["chosen"], "rejected": rec["rejected"]})
        prompt, chosen, rejected = split_conversations(rec["chosen"], rec["rejected"])
        assert (prompt, chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


def test_standard_explicit_and_implicit_give_the_same_pair(tmp_path):
    explicit = load_pairs(write_lines(tmp_path / "e.jsonl", STANDARD_EXPLICIT))
    implicit = load_pairs(write_lines(tmp_path / "i.jsonl", STANDARD_IMPLICIT))
    assert (explicit.format, implicit.format) == ("explicit", "implicit")
    (pair,) = implicit.pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")
    assert implicit.pairs == explicit.pairs
    assert pair.prompt + pair.chosen == STANDARD_IMPLICIT[0]["chosen"]


@pytest.mark.parametrize("chosen, rejected, prompt", [
    ("The sky is blue.", "The sky is green.", "The sky is"),  # TRL's doc example
    ("The sky is blue.", "The sky is black.", "The sky is"),  # shared 'bl': not cut mid-word
    ("Q: 2+2?\n\nA:\n\nFour.", "Q: 2+2?\n\nA:\n\nFive.", "Q: 2+2?\n\nA:"),  # whole run moves
    ("Say it: yes", "Say it: yes please", "Say it:"),  # one is a prefix of the other
    ("The sky is", "The sky is blue.", "The sky"),  # ... ending where a word may go on
    ("天空是蓝色的", "天空是绿色的", "天空是"),  # no whitespace: cut where they differ
    ("Yes.", "No.", ""),  # nothing shared
])
def test_implicit_prompt_ends_at_a_word_boundary(chosen, rejected, prompt):
    assert chosen[: implicit_prompt_end(chosen, rejected)] == prompt


def test_trl_cuts_mid_word_where_tether_does_not():
    """Documented difference: TRL's extract_prompt on strings cuts at the first differing
    character (and moves a single preceding space into the responses)."""
    from trl.data_utils import extract_prompt

    ours = implicit_prompt_end("The sky is blue.", "The sky is black.")
    theirs = extract_prompt({"chosen": "The sky is blue.", "rejected": "The sky is black."})
    assert theirs == {"prompt": "The sky is bl", "chosen": "ue.", "rejected": "ack."}
    assert "The sky is blue."[:ours] == "The sky is"
    # Where the words share no letters the two agree.
    same = extract_prompt(STANDARD_IMPLICIT[0])
    assert same["prompt"] == "The sky is blue."[: implicit_prompt_end(**STANDARD_IMPLICIT[0])]


def test_common_prefix_length_matches_os_path_commonprefix():
    import os
    import random

    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("ab ") for _ in range(rng.randrange(12)))
        b = "".join(rng.choice("ab ") for _ in range(rng.randrange(12)))
        assert common_prefix_length(a, b) == len(os.path.commonprefix([a, b]))


def test_detection_and_named_formats(tmp_path, tok):
    assert detect_format(H4_ULTRAFEEDBACK[0]) == "ultrafeedback"
    assert detect_format(TRL_ULTRAFEEDBACK[0]) == "chat_implicit"
    assert detect_format(MULTI_TURN_EXPLICIT[0]) == "chat"
    assert detect_format(STANDARD_EXPLICIT[0]) == "explicit"
    assert detect_format(STANDARD_IMPLICIT[0]) == "implicit"
    assert detect_format({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) == "hh"
    assert detect_format({"question": "q"}) is None
    # Named: the H4 file read as chat_implicit ignores its prompt column; the same pairs.
    h4 = write_lines(tmp_path / "h4.jsonl", H4_ULTRAFEEDBACK)
    named = load_pairs(h4, tokenizer=tok, format="chat_implicit")
    assert named.pairs == load_pairs(h4, tokenizer=tok).pairs
    # A file without `prompt` named ultrafeedback says which field is missing.
    with pytest.raises(DataError) as err:
        load_pairs(write_lines(tmp_path / "t.jsonl", TRL_ULTRAFEEDBACK), tokenizer=tok,
                   format="ultrafeedback")
    assert str(err.value).endswith(":1: field 'prompt': missing (expected a non-empty string)")
    for fmt in ("chat_implicit", "ultrafeedback"):  # conversations need the chat template
        with pytest.raises(DataError) as err:
            load_pairs(h4, format=fmt)
        assert err.value.reason == "no_tokenizer"


def test_h4_ultrafeedback_parquet_with_nested_conversations(tmp_path, tok):
    path = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(H4_ULTRAFEEDBACK), path)
    from_parquet = load_pairs(path, tokenizer=tok)
    assert from_parquet.format == "ultrafeedback"
    assert from_parquet.pairs == load_pairs(
        write_lines(tmp_path / "uf.jsonl", H4_ULTRAFEEDBACK), tokenizer=tok
    ).pairs


# ---------------------------------------------------------------- bad records of the new shapes


def conv_bad_cases():
    good = TRL_ULTRAFEEDBACK[0]
    u, a = good["chosen"]
    return [
        # (format file records, line-2 record, field, reason, message fragment)
        (TRL_ULTRAFEEDBACK, {**good, "chosen": [u], "rejected": [user("other")]}, "chosen",
         "wrong_role", "the conversation has no assistant turn"),
        (TRL_ULTRAFEEDBACK, {**good, "rejected": [user("Different question?"), a]}, "rejected",
         "no_common_prefix", "shares no leading message with 'chosen'"),
        (TRL_ULTRAFEEDBACK, {**good, "rejected": [u, a, user("more?")]}, "chosen",
         "empty_field", "no response after the 2 message(s) shared"),
        (TRL_ULTRAFEEDBACK, {**good, "rejected": [u, user("again?"), a]}, "rejected[1].role",
         "wrong_role", "expected 'assistant' (the first message where chosen and rejected differ"),
        (TRL_ULTRAFEEDBACK, {**good, "rejected": [u, assistant("Other."), user("ok?")]},
         "rejected[2].role", "wrong_role", "expected the conversation to end with an assistant turn"),
        (TRL_ULTRAFEEDBACK, {**good, "rejected": good["chosen"]}, "rejected",
         "identical_responses", "identical to 'chosen'"),
        (TRL_ULTRAFEEDBACK, {**good, "rejected": [u, assistant(" " + a["content"] + "\n")]},
         "rejected", "identical_responses", "only in whitespace"),
        (TRL_ULTRAFEEDBACK, {**good, "rejected": [u, assistant("   ")]}, "rejected[1].content",
         "empty_field", "got only whitespace"),
        (TRL_ULTRAFEEDBACK, {**good, "score_chosen": "8.5"}, "score_chosen", "wrong_type",
         "expected a finite number or null, got str"),
        (TRL_ULTRAFEEDBACK, {**good, "score_rejected": None}, "score_rejected", "missing_field",
         "'score_chosen' is set and the two scores come together"),
        (H4_ULTRAFEEDBACK, {**H4_ULTRAFEEDBACK[0], "prompt": "Some other question?"}, "prompt",
         "prompt_mismatch", "'Some other question?' is not a user turn of the conversation: "
         "chosen[0].content is 'How can I build a habit of drawing every day?'"),
        (H4_ULTRAFEEDBACK, {**H4_ULTRAFEEDBACK[0], "prompt": "  "}, "prompt", "empty_field",
         "got only whitespace"),
        (STANDARD_IMPLICIT, {"chosen": "Yes.", "rejected": "No."}, "rejected", "no_common_prefix",
         "shares no prefix with 'chosen'"),
        (STANDARD_IMPLICIT, {"chosen": "The sky is ", "rejected": "The sky is blue."}, "chosen",
         "empty_field", "empty response after the shared prompt"),
        (STANDARD_IMPLICIT, {"chosen": "The sky is blue.", "rejected": "The sky is  blue. "},
         "rejected", "identical_responses", "only in whitespace"),
        (STANDARD_IMPLICIT, {**STANDARD_IMPLICIT[0], "margin": float("nan")}, "margin",
         "wrong_type", "expected a finite number or null, got nan"),
        (STANDARD_IMPLICIT, {**STANDARD_IMPLICIT[0], "margin": 10**400}, "margin",
         "wrong_type", "expected a finite number or null, got inf"),
        (STANDARD_IMPLICIT, {**STANDARD_IMPLICIT[0], "margin": True}, "margin",
         "wrong_type", "expected a finite number or null, got bool"),
    ]


@pytest.mark.parametrize("records, bad, field, reason, fragment", conv_bad_cases())
def test_bad_records_of_the_new_shapes(tmp_path, tok, records, bad, field, reason, fragment):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as err:
        load_pairs(path, tokenizer=tok)
    assert str(err.value).startswith(f"{path}:2: field '{field}': ")
    assert fragment in str(err.value)
    assert (err.value.line, err.value.field, err.value.reason) == (2, field, reason)
    loaded = load_pairs(path, tokenizer=tok, on_bad_record="skip")
    assert loaded.skipped == {reason: 1} and len(loaded.pairs) == 1


# ---------------------------------------------------------------- whitespace (every shape)


def test_the_whitespace_check_equals_its_definition_on_fuzzed_pairs():
    """The prefix short-cut in `_differ_only_in_whitespace` decides exactly as removing all
    whitespace from both whole strings does (near-misses around the 64-character window)."""
    import random

    from offline.formats import _differ_only_in_whitespace

    rng = random.Random(0)
    spaces = [" ", "\n", "\t", "\u3000", "\xa0", "  \n "]

    def variant(text: str) -> str:  # the same text with whitespace added, removed or moved
        out = []
        for ch in text:
            if ch.isspace() and rng.random() < 0.5:
                continue
            out.append(ch)
            if rng.random() < 0.1:
                out.append(rng.choice(spaces))
        return "".join(out)

    checked = same = 0
    for _ in range(3000):
        base = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 150)))
        other = variant(base)
        if rng.random() < 0.5:  # change one character somewhere (often past the window)
            at = rng.randrange(len(other) + 1)
            other = other[:at] + rng.choice("abz ") + other[at:]
        want = "".join(base.split()) == "".join(other.split())
        assert _differ_only_in_whitespace(base, other) == want, (base, other)
        checked, same = checked + 1, same + want
    assert 0 < same < checked  # both outcomes were exercised


def test_whitespace_only_fields_are_empty_and_whitespace_differences_are_no_preference(tmp_path):
    cases = [
        ({"prompt": " \n\t", "chosen": "a", "rejected": "b"}, "prompt", "empty_field"),
        ({"prompt": "p", "chosen": "\n", "rejected": "b"}, "chosen", "empty_field"),
        ({"prompt": "p", "chosen": "Paris.", "rejected": " Paris.\n"}, "rejected",
         "identical_responses"),
        ({"prompt": "p", "chosen": "a b", "rejected": "ab"}, "rejected", "identical_responses"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "  \n"}, "rejected", "empty_field"),
    ]
    for record, field, reason in cases:
        path = write_lines(tmp_path / "x.jsonl", [record])
        with pytest.raises(DataError) as err:
            load_pairs(path)
        assert (err.value.field, err.value.reason) == (field, reason), str(err.value)
    # Whitespace inside a text is kept as it is (only the decision treats it as empty).
    (pair,) = load_pairs(write_lines(tmp_path / "y.jsonl", [
        {"prompt": " p ", "chosen": " a\n", "rejected": "b"}])).pairs
    assert (pair.prompt, pair.chosen) == (" p ", " a\n")


# ---------------------------------------------------------------- scores and the margin filter


def test_scores_do_not_change_content_ids_or_the_fingerprint(tmp_path):
    scored = write_lines(tmp_path / "s.jsonl", [
        {"prompt": "p1", "chosen": "a", "rejected": "b", "score_chosen": 9, "score_rejected": 1},
        {"prompt": "p2", "chosen": "a", "rejected": "b", "margin": 0.25},
    ])
    plain = write_lines(tmp_path / "p.jsonl", [
        {"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "a", "rejected": "b"},
    ])
    cfg = dict(heldout_fraction=0.5)
    with_scores = load_preference_dataset(DataConfig(path=str(scored), **cfg))
    without = load_preference_dataset(DataConfig(path=str(plain), **cfg))
    assert with_scores.fingerprint == without.fingerprint
    assert [p.content_id for p in with_scores.pairs] == [p.content_id for p in without.pairs]
    by_prompt = {p.prompt: p for p in with_scores.pairs}
    assert (by_prompt["p1"].score_chosen, by_prompt["p1"].score_rejected) == (9.0, 1.0)
    assert (by_prompt["p1"].score_margin, by_prompt["p2"].score_margin) == (8.0, 0.25)
    # write_jsonl keeps them: the file loads back to equal pairs.
    out = write_jsonl(with_scores.pairs, tmp_path / "out.jsonl")
    assert load_pairs(out).pairs == with_scores.pairs
    assert PreferencePair(prompt="p1", chosen="a", rejected="b").content_id == by_prompt["p1"].content_id


def test_min_score_margin_drops_and_counts_pairs_below_it(tmp_path, tok):
    """H4 record 0 has margin 8.5 - 6.0 = 2.5, record 1 is a tie (0.0); a third record's own
    `margin` column (3.0) wins over its scores (1.0 - 9.0 = -8.0)."""
    third = {**H4_ULTRAFEEDBACK[0], "chosen": H4_ULTRAFEEDBACK[0]["chosen"][:1] + [assistant("Draw daily.")],
             "score_chosen": 1.0, "score_rejected": 9.0, "margin": 3.0}
    path = write_lines(tmp_path / "uf.jsonl", H4_ULTRAFEEDBACK + [third])
    for threshold, kept in ((None, 3), (-10.0, 3), (0.0, 3), (0.5, 2), (2.5, 2), (2.6, 1), (3.0, 1)):
        ds = load_preference_dataset(DataConfig(path=str(path), min_score_margin=threshold), tok)
        assert (len(ds.pairs), ds.below_min_score_margin) == (kept, 3 - kept), threshold
        assert ds.min_score_margin == threshold
    with pytest.raises(DataError) as err:
        load_pairs(path, tokenizer=tok, min_score_margin=5)
    assert str(err.value) == f"{path}: all 3 records were skipped (below_min_score_margin: 3)"


def test_min_score_margin_needs_scores(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 2, "score_rejected": 1},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ])
    with pytest.raises(DataError) as err:
        load_pairs(path, min_score_margin=0.5)
    assert str(err.value).startswith(f"{path}:2: field 'score_chosen': missing (data.min_score_margin")
    loaded = load_pairs(path, min_score_margin=0.5, on_bad_record="skip")
    assert loaded.skipped == {"missing_field": 1} and len(loaded.pairs) == 1
    assert len(load_pairs(path).pairs) == 2  # without the filter, scores are optional


def test_hh_keeps_its_lone_space_reply(tmp_path):
    """HH is unchanged: the reply after the last shared 'Assistant:' keeps its leading space, so
    an empty reply is ' ' and loads (the real harmless-base test file has 4 such records)."""
    record = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: "}
    (pair,) = load_pairs(write_lines(tmp_path / "hh.jsonl", [record])).pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == ("\n\nHuman: a\n\nAssistant:", " b", " ")


def test_config_names_exactly_the_formats_there_are():
    from typing import get_args

    from offline.formats import Format, normaliser

    assert set(get_args(DataConfig.model_fields["format"].annotation)) == {"auto", *get_args(Format)}
    for fmt in get_args(Format):
        assert callable(normaliser(fmt, byte_tokenizer()))
