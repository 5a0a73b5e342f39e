"""Tokenizers and text-encoder configs of the tiny random-weight models, built offline (nothing downloaded)."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTokenizer, T5TokenizerFast

TEXT_WIDTH = 32
CONTEXT_LENGTH = 77


def clip_tokenizer() -> Any:
    """A CLIPTokenizer over single bytes (no merges): any caption tokenises, the vocabulary has 514 entries."""

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, as in CLIP: open_clip-style argmax pooling finds it
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT_LENGTH)


def clip_text_config(tokenizer: Any, **extra: Any) -> Any:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def t5_tokenizer() -> Any:
    """A T5 tokenizer (SentencePiece-style unigram over single characters, `</s>` appended), built offline."""

    specials = ["<pad>", "</s>", "<unk>"]
    pieces = [(token, 0.0) for token in specials] + [(c, -1.0) for c in sorted(ByteLevel.alphabet())] + [
        ("\u2581", -1.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0)
