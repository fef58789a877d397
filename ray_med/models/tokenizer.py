"""Training the tiny presets' byte-level BPE tokenizer on a job's own corpus.

Tiny presets have no pretrained tokenizer and the hub is off limits, so a job trains
one with the ``tokenizers`` library. Byte-level BPE never produces an unknown token
(any UTF-8 text decodes back exactly), which keeps medical text with units and
symbols (``°C``, ``µg``, ``–``) intact. The result is a ``PreTrainedTokenizerFast``
saved in Hugging Face format, so ``AutoTokenizer`` (through
:func:`ray_med.models.loading.load_tokenizer`) loads it back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ray_med.errors import ModelError

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
# This order gives pad=0, bos=1, eos=2: Llama's default bos/eos ids, so the tiny-llama
# config and the tokenizer agree without passing ids around.
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 2048,
    min_frequency: int = 2,
    model_max_length: int = 4096,
    out_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; save it to ``out_dir`` if given.

    ``texts`` is consumed once, lazily, so a generator over a large corpus is fine.
    ``model_max_length`` is only the length above which transformers warns: documents
    are tokenized whole and then packed into the model's sequence length.
    """
    if isinstance(texts, str):
        raise ModelError("train_bpe_tokenizer takes an iterable of texts, not one string; wrap it in a list")
    if vocab_size < _MIN_VOCAB:
        raise ModelError(f"tokenizer vocab_size must be at least {_MIN_VOCAB} (256 bytes + specials), got {vocab_size}")
    if min_frequency < 1:
        raise ModelError(f"tokenizer min_frequency must be >= 1, got {min_frequency}")
    seen = 0

    def _nonempty() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            if text:
                seen += 1
                yield text

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary from the start, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(), trainer=trainer)
    if seen == 0:
        raise ModelError("cannot train a tokenizer on an empty corpus: no source yielded any text")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        # Clean-up rewrites " ." to "." on decode, which would break exact round trips.
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast
