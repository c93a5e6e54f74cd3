"""A byte-level BPE tokenizer trained on a text with the ``tokenizers`` library, wrapped for transformers."""
from __future__ import annotations

EOS = "<|endoftext|>"


class TokenizerError(ValueError):
    """A text or vocabulary a tokenizer cannot be trained from."""


def train_tokenizer(text: str, vocab_size: int = 4096):
    """A PreTrainedTokenizerFast (byte-level BPE, ``vocab_size`` entries, one special token ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not 257 <= vocab_size <= 65536:
        raise TokenizerError(f"vocabulary size must be in 257..65536 (256 bytes and the end-of-text token), got {vocab_size}")
    if not text.strip():
        raise TokenizerError("the training text is empty")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    if tok.get_vocab_size() < vocab_size:  # the trainer ran out of pairs to merge
        raise TokenizerError(f"the text fills only {tok.get_vocab_size()} of {vocab_size} vocabulary entries: "
                             "give a longer text or a smaller --vocab")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None,
                                   model_max_length=1 << 30)
