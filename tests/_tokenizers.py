"""Tiny real tokenizers built in-process for the data tests (no downloads).

`byte_tokenizer()`: byte-level BPE with no merges, so an ASCII text of n characters is exactly
n tokens (lets tests state expected lengths by hand). `bpe_tokenizer(corpus)`: byte-level BPE
trained on `corpus`, a realistic subword tokenizer. Both are `PreTrainedTokenizerFast` with
EOS/PAD tokens and, unless `chat_template=None`, the simple chat template `CHAT_TEMPLATE`:
each message renders as `<|role|>content<|end|>\\n`, the generation prompt as `<|assistant|>`.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|eos|>", "<|pad|>"]


def _wrap(tok: Tokenizer, chat_template: str | None, name: str) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>", name_or_path=name
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _train(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # GPT-2 word pre-split: merges stay inside words (and are cached per word, which is fast).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def byte_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (258 ids: 256 bytes + EOS + PAD)."""
    return _wrap(_train([""], vocab_size=258), chat_template, "tiny-byte")


def bpe_tokenizer(
    corpus: Iterable[str], vocab_size: int = 1000, chat_template: str | None = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` (merges make token counts differ from lengths)."""
    return _wrap(_train(corpus, vocab_size), chat_template, "tiny-bpe")
