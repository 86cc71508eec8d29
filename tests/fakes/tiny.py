"""Offline test kit: tiny random models that share a real tokenizer, built from a config.

Used by the test suite and the benchmarks; handy for users writing their own tests. Nothing here
touches a network.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_llama(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    vocab_size: int | None = None,
) -> Path:
    """Save a seeded random Llama with the tokenizer of `tokenizer_dir` to `out_dir`.

    `vocab_size` defaults to the tokenizer's size; pass a larger one to mimic the padded
    vocabularies some model families ship.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
