"""offline/token_store.py + offline/tokenized.py: the compact, cached, memory-mapped token store.

Expected ids come from an independent statement of the truncation rule applied to one
tokenizer call per text (the layout before the store); tokenizers are built in-process
(tests/_tokenizers.py), the model for the training check is a tiny Llama.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import offline.tokenize as tokenize_mod
import offline.tokenized as tokenized_mod
from _tokenizers import CHAT_TEMPLATE, bpe_tokenizer, byte_tokenizer
from offline.config import DataConfig, LossConfig, TrainConfig
from offline.coverage import coverage_of, coverage_report
from offline.data import DataError, load_preference_dataset
from offline.reference import ReferenceLogpCache, compute_reference_logps
from offline.token_store import TokenizedPair, TokenizedPairs, TokenStore, pair_ids, pair_lengths
from offline.tokenize import tokenize_pairs, tokenizer_identity
from offline.tokenized import load_tokenized_dataset, tokenize_dataset
from offline.train import train

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat while dogs ran far away from home and then came back again".split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def records(n: int = 60, seed: int = 0) -> list[dict]:
    """Pairs of varied length (some prompts and responses longer than the limits below)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"prompt": sentence(rng, 1, 30), "chosen": " " + sentence(rng, 1, 25),
               "rejected": " " + sentence(rng, 1, 25), "id": f"r{i}"}
        if i % 3:
            rec["category"] = "ab"[i % 2]
        out.append(rec)
    return out


def write(path: Path, recs: list[dict], extra_lines: list[str] = ()) -> Path:
    path.write_text("\n".join([json.dumps(r) for r in recs] + list(extra_lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer([r[k] for r in records(200, seed=9) for k in ("prompt", "chosen")], vocab_size=300)


@pytest.fixture()
def data(tmp_path: Path) -> DataConfig:
    """60 pairs + a duplicate + a bad line (skipped), limits that cut some pairs."""
    recs = records()
    path = write(tmp_path / "pairs.jsonl", recs + [recs[4]], ['{"prompt": 1, "chosen": "a", "rejected": "b"}'])
    return DataConfig(path=str(path), on_bad_record="skip", max_length=40, max_prompt_length=24,
                      heldout_fraction=0.2)


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """7 pairs a tokenizer call, so the 60-pair files stream through several batches."""
    monkeypatch.setattr(tokenized_mod, "BATCH_PAIRS", 7)
    monkeypatch.setattr(tokenize_mod, "BATCH_PAIRS", 7)


def expected(pairs, tokenizer, max_length: int, max_prompt_length: int) -> list[tuple]:
    """The rule stated by hand, one tokenizer call per text: the prompt keeps its last
    max_prompt_length ids; each response + EOS keeps its first max_length - len(prompt)."""
    eos = tokenizer.eos_token_id
    out = []
    for p in pairs:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (p.prompt, p.chosen, p.rejected)]
        prompt = ids[0][-max_prompt_length:]
        room = max_length - len(prompt)
        chosen, rejected = (ids[1] + [eos])[:room], (ids[2] + [eos])[:room]
        cut = len(ids[0]) > max_prompt_length or len(ids[1]) + 1 > room or len(ids[2]) + 1 > room
        out.append((p.content_id, p.category, tuple(prompt), tuple(chosen), tuple(rejected), cut))
    return out


def as_tuples(pairs) -> list[tuple]:
    return [(p.pair_id, p.category, p.prompt_ids, p.chosen_ids, p.rejected_ids, p.truncated) for p in pairs]


def entries(cache: Path) -> list[Path]:
    """Published cache entries (not `sources/`, not temp dirs)."""
    return sorted(p for p in cache.iterdir() if p.is_dir() and p.name != "sources" and not p.name.startswith("."))


# ---------------------------------------------------------------- read back = fresh tokenisation


@pytest.mark.parametrize("make", ["byte", "bpe"])
def test_ids_read_back_from_the_mapped_store_equal_a_fresh_tokenisation(tmp_path, data, bpe, make):
    tok = byte_tokenizer() if make == "byte" else bpe
    reference = load_preference_dataset(data)
    cold = load_tokenized_dataset(data, tok, tmp_path / "cache")
    warm = load_tokenized_dataset(data, tok, tmp_path / "cache")
    assert (cold.cached, warm.cached) == (False, True)
    assert isinstance(warm.store.tokens, np.memmap)  # mapped, not read into memory
    for ds in (cold, warm, load_tokenized_dataset(data, tok, None)):  # no cache: in memory
        assert as_tuples(ds.train) == expected(reference.train, tok, 40, 24)
        assert as_tuples(ds.heldout) == expected(reference.heldout, tok, 40, 24)
        assert (ds.fingerprint, ds.source, ds.format) == (reference.fingerprint, reference.source, "explicit")
        assert (ds.skipped, ds.duplicates) == ({"wrong_type": 1}, 1)
        assert ds.token_bytes == 4 * sum(p.n_tokens - len(p.prompt_ids) for p in ds.pairs)
    assert any(p.truncated for p in cold.pairs)  # the rule had work to do
    assert make == "byte" or not all(p.truncated for p in cold.pairs)  # byte: every text is long
    # an already loaded dataset tokenises to the same store, in memory
    assert as_tuples(tokenize_dataset(reference, tok, 40, 24).pairs) == as_tuples(cold.pairs)


def test_chat_records_are_rendered_and_cached_with_the_template(tmp_path, bpe):
    rng = random.Random(3)
    recs = [{"prompt": [{"role": "user", "content": sentence(rng, 2, 9)}],
             "chosen": sentence(rng, 1, 6), "rejected": sentence(rng, 1, 6)} for _ in range(20)]
    cfg = DataConfig(path=str(write(tmp_path / "chat.jsonl", recs)), max_length=64, max_prompt_length=32)
    reference = load_preference_dataset(cfg, tokenizer=bpe)
    ds = load_tokenized_dataset(cfg, bpe, tmp_path / "cache")
    assert ds.format == "chat" and ds.fingerprint == reference.fingerprint
    assert as_tuples(ds.pairs) == expected(reference.train + reference.heldout, bpe, 64, 32)
    # another chat template renders other prompts: its own source record and entry
    other = bpe_tokenizer([r["chosen"] for r in recs], vocab_size=300, chat_template=CHAT_TEMPLATE.replace("|>", "|] "))
    assert load_tokenized_dataset(cfg, other, tmp_path / "cache").fingerprint != ds.fingerprint


def test_token_store_sequence_view(data, bpe):
    ds = load_tokenized_dataset(data, bpe, None)
    pairs = ds.pairs
    listed = list(pairs)
    assert [pairs[i] for i in range(len(pairs))] == listed and pairs[-1] == listed[-1]
    assert list(pairs[3:9]) == listed[3:9] and isinstance(pairs[3:9], TokenizedPairs)
    assert (pairs.rows == np.concatenate([ds.train.rows, ds.heldout.rows])).all()  # a view, no copy
    assert pair_lengths(pairs).tolist() == pair_lengths(listed).tolist()
    assert pairs.n_tokens().tolist() == [p.n_tokens for p in listed]
    assert pair_ids(pairs) == pair_ids(listed) and pairs.categories() == [p.category for p in listed]
    with pytest.raises(TypeError):
        pairs + tokenize_pairs([], bpe, 40, 24)  # views of two stores do not silently copy


# ---------------------------------------------------------------- the cache key and hits


def test_write_store_copies_a_view_or_tuples_into_a_mapped_store_of_their_own(tmp_path, data, bpe):
    from offline.token_store import write_store

    ds = load_tokenized_dataset(data, bpe, tmp_path / "cache")
    view = ds.heldout + ds.train[3:11]  # rows out of store order
    copied = TokenizedPairs(write_store(view, tmp_path / "view"))
    assert isinstance(copied.store.tokens, np.memmap) and as_tuples(copied) == as_tuples(view)
    assert (copied.store.raw_lengths == ds.store.raw_lengths[view.rows]).all()  # kept from the view
    tuples = TokenizedPairs(write_store(list(view), tmp_path / "tuples"))
    assert as_tuples(tuples) == as_tuples(view) and (tuples.lengths() == view.lengths()).all()
    with pytest.raises(FileExistsError):  # published once, never overwritten
        write_store(list(view), tmp_path / "tuples")


def test_second_load_hits_the_cache_without_parsing_or_tokenizing(tmp_path, data, bpe, monkeypatch):
    first = load_tokenized_dataset(data, bpe, tmp_path / "cache")

    def boom(*args, **kwargs):
        raise AssertionError("called on a cache hit")

    monkeypatch.setattr(tokenize_mod, "token_ids", boom)  # every tokenizer call goes through it
    monkeypatch.setattr(tokenized_mod, "iter_pairs", boom)  # no record is even parsed
    again = load_tokenized_dataset(data, bpe, tmp_path / "cache")
    assert again.cached and as_tuples(again.pairs) == as_tuples(first.pairs)
    assert coverage_of(again) == coverage_of(first)
    # a moved copy of the same bytes still hits: the key is the content, not the name
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes(Path(data.path).read_bytes())
    copy = load_tokenized_dataset(data.model_copy(update={"path": str(moved)}), bpe, tmp_path / "cache")
    assert copy.cached and copy.source == str(moved) and copy.fingerprint == first.fingerprint


def test_other_bytes_with_the_same_pairs_reuse_the_entry_by_fingerprint(tmp_path, data, bpe, monkeypatch):
    first = load_tokenized_dataset(data, bpe, tmp_path / "cache")
    spaced = tmp_path / "spaced.jsonl"  # blank lines and key order change the bytes, not the pairs
    lines = Path(data.path).read_text().splitlines()
    spaced.write_text("\n\n".join(json.dumps(dict(reversed(json.loads(x).items()))) for x in lines) + "\n")
    monkeypatch.setattr(tokenize_mod, "token_ids", lambda *a, **k: pytest.fail("tokenized again"))
    again = load_tokenized_dataset(data.model_copy(update={"path": str(spaced)}), bpe, tmp_path / "cache")
    assert again.cached and again.fingerprint == first.fingerprint
    assert as_tuples(again.pairs) == as_tuples(first.pairs) and len(entries(tmp_path / "cache")) == 1


def test_cache_key_changes_with_the_tokenizer_and_the_limits(tmp_path, data, bpe):
    cache = tmp_path / "cache"
    base = load_tokenized_dataset(data, bpe, cache)
    shorter = load_tokenized_dataset(data.model_copy(update={"max_length": 32}), bpe, cache)
    prompt = load_tokenized_dataset(data.model_copy(update={"max_prompt_length": 8}), bpe, cache)
    byte = load_tokenized_dataset(data, byte_tokenizer(), cache)
    assert not any(d.cached for d in (base, shorter, prompt, byte))
    assert len(entries(cache)) == 4 and len(list((cache / "sources").iterdir())) == 4
    assert max(len(p.chosen_ids) + len(p.prompt_ids) for p in shorter.pairs) <= 32
    assert max(len(p.prompt_ids) for p in prompt.pairs) == 8
    assert as_tuples(byte.pairs) != as_tuples(base.pairs)
    # the identity follows the content, not the object or the directory it was saved in
    assert tokenizer_identity(byte_tokenizer())["id"] == tokenizer_identity(byte_tokenizer())["id"]
    bpe.save_pretrained(tmp_path / "saved")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert tokenizer_identity(reloaded)["id"] == tokenizer_identity(bpe)["id"]
    assert load_tokenized_dataset(data, reloaded, cache).cached
    templated = byte_tokenizer(chat_template=CHAT_TEMPLATE + " ")
    assert tokenizer_identity(templated)["id"] != tokenizer_identity(byte_tokenizer())["id"]


def test_changed_file_content_is_a_miss(tmp_path, data, bpe):
    first = load_tokenized_dataset(data, bpe, tmp_path / "cache")
    recs = records()
    recs[0]["chosen"] = " a different answer"
    write(Path(data.path), recs)
    again = load_tokenized_dataset(data, bpe, tmp_path / "cache")
    assert not again.cached and again.fingerprint != first.fingerprint
    assert as_tuples(again.pairs) == expected(load_preference_dataset(data).pairs, bpe, 40, 24)


def test_a_file_changed_between_the_passes_is_an_error_and_caches_nothing(tmp_path, data, bpe, monkeypatch):
    real, calls = tokenized_mod.iter_pairs, []

    def rewrite_before_pass_two(cfg, *args, **kwargs):
        calls.append(cfg)
        if len(calls) == 2:
            recs = records()
            recs[30]["chosen"] = " swapped under our feet"
            write(Path(cfg.path), recs)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(tokenized_mod, "iter_pairs", rewrite_before_pass_two)
    with pytest.raises(DataError, match="changed while it was being read"):
        load_tokenized_dataset(data, bpe, tmp_path / "cache")
    assert entries(tmp_path / "cache") == [] and not (tmp_path / "cache" / "sources").exists()


def test_bad_records_raise_the_loaders_error_and_cache_nothing(tmp_path, bpe):
    path = write(tmp_path / "bad.jsonl", records(5), ['{"prompt": "p", "chosen": 3, "rejected": "r"}'])
    cfg = DataConfig(path=str(path), max_length=40, max_prompt_length=24)
    with pytest.raises(DataError) as loader:
        load_preference_dataset(cfg)
    with pytest.raises(DataError) as ours:
        load_tokenized_dataset(cfg, bpe, tmp_path / "cache")
    assert str(ours.value) == str(loader.value) == f"{path}:6: field 'chosen': expected a non-empty string, got int"
    assert not (tmp_path / "cache").exists() or entries(tmp_path / "cache") == []


# ---------------------------------------------------------------- atomic: no half cache


def test_an_exception_mid_write_leaves_no_entry_and_the_next_run_rebuilds(tmp_path, data, bpe, monkeypatch):
    real, calls = tokenized_mod.encode_batch, []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenized_mod, "encode_batch", fail_on_third)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        load_tokenized_dataset(data, bpe, cache)
    assert list(cache.iterdir()) == []  # no entry, no temp dir, no source record
    monkeypatch.setattr(tokenized_mod, "encode_batch", real)
    ds = load_tokenized_dataset(data, bpe, cache)
    assert not ds.cached and as_tuples(ds.pairs) == expected(load_preference_dataset(data).pairs, bpe, 40, 24)


def test_a_process_killed_mid_write_leaves_no_entry(tmp_path, data, bpe):
    """SIGKILL after two batches are in `tokens.bin`: nothing is published; the next run
    rebuilds the entry and clears the dead writer's temp dir."""
    cache = tmp_path / "cache"
    bpe.save_pretrained(tmp_path / "tok")
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from transformers import AutoTokenizer
        import offline.tokenized as t
        from offline.config import DataConfig
        t.BATCH_PAIRS, real, n = 7, t.encode_batch, []
        def killer(*a, **k):
            n.append(1)
            if len(n) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        t.encode_batch = killer
        cfg = DataConfig.model_validate_json({data.model_dump_json()!r})
        t.load_tokenized_dataset(cfg, AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r}), {str(cache)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = list(cache.iterdir())
    assert entries(cache) == [] and not (cache / "sources").exists()
    assert [p.name.startswith(".") and ".tmp-" in p.name for p in leftovers] == [True]  # the dead temp dir
    assert (leftovers[0] / "tokens.bin").stat().st_size > 0  # it did die mid-write
    ds = load_tokenized_dataset(data, bpe, cache)
    assert not ds.cached and as_tuples(ds.pairs) == expected(load_preference_dataset(data).pairs, bpe, 40, 24)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_two_processes_building_the_same_entry_at_once_both_succeed(tmp_path, data, bpe):
    """Two real processes tokenise the same data into one cache at the same moment. Barriers
    make the clash certain: both are inside `atomic_dir` writing their temp dirs at once (so the
    later one's stale-dir sweep finds the other's live temp dir), then both reach the publishing
    rename together. Each must end with the same complete store; one entry, no temp dir left."""
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    bpe.save_pretrained(tmp_path / "tok")
    child = textwrap.dedent(f"""
        import json, os, sys, time
        from pathlib import Path
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from transformers import AutoTokenizer
        import offline.checkpoint as ck
        import offline.token_store as ts
        import offline.tokenized as t
        from offline.config import DataConfig
        sync = Path({str(sync)!r})

        def barrier(name):
            (sync / f"{{name}}-{{os.getpid()}}").touch()
            deadline = time.monotonic() + 120
            while len(list(sync.glob(f"{{name}}-*"))) < 2:
                if time.monotonic() > deadline:
                    sys.exit(f"barrier {{name}}: the other process never came")
                time.sleep(0.01)

        real_finish, real_fsync = ts.StoreBuilder.finish, ck.fsync_tree
        def finish(self, *a, **k):
            if k.get("directory") is not None:
                barrier("writing")  # both temp dirs exist and are being written
            return real_finish(self, *a, **k)
        def fsync_tree(path):
            barrier("publishing")  # both about to rename into the one entry
            return real_fsync(path)
        ts.StoreBuilder.finish, ck.fsync_tree = finish, fsync_tree
        t.BATCH_PAIRS = 7
        cfg = DataConfig.model_validate_json({data.model_dump_json()!r})
        ds = t.load_tokenized_dataset(cfg, AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r}), {str(cache)!r})
        print(json.dumps([[p.pair_id, p.category, p.prompt_ids, p.chosen_ids, p.rejected_ids, p.truncated]
                          for p in ds.pairs]))
    """)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    assert len(list(sync.glob("publishing-*"))) == 2  # the clash did happen: both reached the rename
    want = [list(map(list, t[2:5])) for t in expected(load_preference_dataset(data).pairs, bpe, 40, 24)]
    for out, _ in outs:
        got = json.loads(out.splitlines()[-1])
        assert [g[2:5] for g in got] == want
    (entry,) = entries(cache)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    again = load_tokenized_dataset(data, bpe, cache)
    assert again.cached and as_tuples(again.pairs) == expected(load_preference_dataset(data).pairs, bpe, 40, 24)


def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path, data, bpe):
    cache = tmp_path / "cache"
    load_tokenized_dataset(data, bpe, cache)
    (entry,) = entries(cache)
    np.save(tmp_path / "short.npy", np.zeros(3, dtype=np.int64))
    os.replace(tmp_path / "short.npy", entry / "offsets.npy")  # disagrees with store.json
    with pytest.raises(ValueError, match="damaged"):
        TokenStore.open(entry)
    again = load_tokenized_dataset(data, bpe, cache)
    assert not again.cached and entries(cache) == [entry]
    assert as_tuples(again.pairs) == expected(load_preference_dataset(data).pairs, bpe, 40, 24)


# ---------------------------------------------------------------- consumers


def test_coverage_from_the_store_equals_the_report_from_texts(tmp_path, data, bpe):
    dataset = load_preference_dataset(data)
    from_texts = coverage_report(dataset, bpe, data.max_length, data.max_prompt_length)
    cold = load_tokenized_dataset(data, bpe, tmp_path / "cache")
    warm = load_tokenized_dataset(data, bpe, tmp_path / "cache")
    assert coverage_of(cold) == coverage_of(warm) == from_texts
    assert from_texts.truncated_pairs > 0 and from_texts.skipped == {"wrong_type": 1}


def scored_records(n: int = 60) -> list[dict]:
    """`records` with scores: margins -2.5 .. 3.5 from either score pair or the margin column;
    every 9th record has none (skipped as missing_field when min_score_margin is set)."""
    out = []
    for i, rec in enumerate(records(n, seed=3)):
        if i % 9 == 8:
            pass
        elif i % 2:
            rec = {**rec, "margin": (i % 7) - 2.5}
        else:
            rec = {**rec, "score_chosen": 5.0 + (i % 5), "score_rejected": 6.0}
        out.append(rec)
    return out


@pytest.mark.parametrize("min_score_margin", [None, 0.5])
def test_scores_and_the_margin_filter_through_the_store_cold_and_cached(tmp_path, bpe, min_score_margin):
    """offline.formats' scores and data.min_score_margin behave through the token store as
    through the loader: the same pairs kept, the same drops counted, and the cached run (which
    parses nothing) reports the same coverage, scored pairs and margin drops included."""
    path = write(tmp_path / "scored.jsonl", scored_records())
    cfg = DataConfig(path=str(path), on_bad_record="skip", max_length=40, max_prompt_length=24,
                     heldout_fraction=0.2, min_score_margin=min_score_margin)
    loader = load_preference_dataset(cfg)
    from_texts = coverage_report(loader, bpe, cfg.max_length, cfg.max_prompt_length)
    cold = load_tokenized_dataset(cfg, bpe, tmp_path / "cache")
    warm = load_tokenized_dataset(cfg, bpe, tmp_path / "cache")
    memory = load_tokenized_dataset(cfg, bpe)  # no cache: the one-pass path
    assert not cold.cached and warm.cached
    for ds in (cold, warm, memory):
        assert as_tuples(ds.pairs) == expected(loader.pairs, bpe, 40, 24)
        assert (ds.fingerprint, ds.below_min_score_margin, ds.min_score_margin) == (
            loader.fingerprint, loader.below_min_score_margin, min_score_margin)
        assert coverage_of(ds) == from_texts
        assert coverage_of(ds).to_markdown() == from_texts.to_markdown()
    assert from_texts.scored_pairs == sum(p.score_margin is not None for p in loader.pairs) > 0
    if min_score_margin is None:
        assert from_texts.below_min_score_margin == 0 and from_texts.skipped == {}
    else:
        assert from_texts.below_min_score_margin > 0 and from_texts.skipped == {"missing_field": 6}
        assert from_texts.scored_pairs == len(loader.pairs)


def test_score_errors_name_file_line_and_field_through_the_store(tmp_path, bpe):
    recs = records(5)
    bad = [{**recs[0], "score_chosen": "high", "score_rejected": 1}, {**recs[1], "score_chosen": 2.0}]
    for i, rec in enumerate(bad):
        path = write(tmp_path / f"bad{i}.jsonl", recs[2:] + [rec])
        cfg = DataConfig(path=str(path), max_length=40, max_prompt_length=24)
        with pytest.raises(DataError) as loader:
            load_preference_dataset(cfg)
        with pytest.raises(DataError) as ours:
            load_tokenized_dataset(cfg, bpe, tmp_path / "cache")
        assert str(ours.value) == str(loader.value)
        assert str(ours.value).startswith(f"{path}:4: field 'score_")
    path = write(tmp_path / "unscored.jsonl", recs)
    cfg = DataConfig(path=str(path), max_length=40, max_prompt_length=24, min_score_margin=1.0)
    with pytest.raises(DataError) as ours:
        load_tokenized_dataset(cfg, bpe, tmp_path / "cache")
    assert str(ours.value) == f"{path}:1: field 'score_chosen': missing (data.min_score_margin is set, so every record needs score_chosen/score_rejected or margin)"
    assert not (tmp_path / "cache").exists() or entries(tmp_path / "cache") == []


def test_training_on_the_mapped_store_equals_training_on_tuples(tmp_path, data):
    """Same pairs as the old tuple layout and as the store: the same reference log-probs, and
    a bit-identical loss curve and final weights (CPU, fixed seed)."""
    tok = byte_tokenizer()
    load_tokenized_dataset(data, tok, tmp_path / "cache")
    mapped = load_tokenized_dataset(data, tok, tmp_path / "cache")
    assert mapped.cached
    tuples = [TokenizedPair(*t) for t in expected(load_preference_dataset(data).train, tok, 40, 24)]
    cfg = TrainConfig(loss=LossConfig(beta=0.1), learning_rate=1e-3, batch_size=4, epochs=1, max_steps=4)
    results = []
    for pairs in (mapped.train, tuples):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128))
        ref = compute_reference_logps(model, pairs, "ref", ReferenceLogpCache(None), 8, False,
                                      pad_token_id=tok.pad_token_id)
        out = train(model, pairs, ref, cfg, pad_token_id=tok.pad_token_id, progress=False)
        results.append((ref, [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in out.history],
                        out.step_pair_ids, [p.detach().clone() for p in model.parameters()]))
    (ref_a, hist_a, ids_a, w_a), (ref_b, hist_b, ids_b, w_b) = results
    assert ref_a == ref_b and hist_a == hist_b and ids_a == ids_b
    assert all(torch.equal(a, b) for a, b in zip(w_a, w_b))
