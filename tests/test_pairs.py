"""The pair type and its content id."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from pydantic import ValidationError

from offline.pairs import PreferencePair, content_hash

ALPHABET = [chr(c) for c in range(0x80)] + ["\u2028", "\u2029", "\u0085", "\ufeff", "é", "中", "\U0001f600", "\U0010ffff"]


def reference_hash(prompt: str, chosen: str, rejected: str) -> str:
    """The definition the fast encoder must reproduce byte for byte."""
    blob = json.dumps([prompt, chosen, rejected], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def test_content_hash_equals_its_json_definition_on_fuzzed_text():
    rng = random.Random(0)
    for _ in range(5_000):
        texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 20))) for _ in range(3)]
        assert content_hash(*texts) == reference_hash(*texts)


def test_content_id_ignores_provenance_and_id_prefers_the_source_id():
    a = PreferencePair(prompt="p", chosen="c", rejected="r", category="x", source_id="row-1")
    b = PreferencePair(prompt="p", chosen="c", rejected="r")
    assert a.content_id == b.content_id == content_hash("p", "c", "r")
    assert a.id == "row-1" and b.id == b.content_id
    # field boundaries matter: moving text between fields changes the id
    assert content_hash("pc", "", "r") != content_hash("p", "c", "r")


def test_empty_texts_are_rejected():
    with pytest.raises(ValidationError):
        PreferencePair(prompt="p", chosen="", rejected="r")
