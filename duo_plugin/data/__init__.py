"""Data: tokenizers, text → token documents → blocks, deterministic resumable order, built-in corpora."""

from duo_plugin.data.tokenizers import (  # noqa: F401
    DuoTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    check_vocab,
    load_tokenizer,
    train_sentencepiece,
)
from duo_plugin.data.text import (  # noqa: F401
    GlobalBatchSampler,
    TokenBlockDataset,
    TokenizedDocs,
    collate_blocks,
    load_documents,
    load_tokenized,
    pad_sentences,
    shard,
    split_heldout,
    wrap_blocks,
)
from duo_plugin.data.corpora import load_shakespeare, shakespeare_documents  # noqa: F401
from duo_plugin.data.blocks import TextBlocks, text_blocks, text_documents  # noqa: F401
