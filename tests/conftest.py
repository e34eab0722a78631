"""Shared fixtures: tiny random models built in-process, and an offline tokenizer.

Unit tests never load files from a hub: the tokenizer is a byte-level BPE trained here on our own
base queries, the models are random with hidden size 64, so the whole unit tier runs in seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from ifsteer.models import LoadedModel
from ifsteer.prompts import BASE_QUERIES

TINY_VOCAB = 320


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(list(BASE_QUERIES) * 2, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<pad>"
    )


def tiny_llama_config(vocab_size: int = TINY_VOCAB, layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def make_tiny(config, tokenizer, model_id: str = "tiny-llama", seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return LoadedModel(model, tokenizer, model_id)


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer) -> LoadedModel:
    return make_tiny(tiny_llama_config(), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer) -> LoadedModel:
    config = GPT2Config(
        n_embd=64,
        n_layer=3,
        n_head=4,
        vocab_size=TINY_VOCAB,
        n_positions=512,
        bos_token_id=0,
        eos_token_id=0,
    )
    return make_tiny(config, tiny_tokenizer, "tiny-gpt2")
