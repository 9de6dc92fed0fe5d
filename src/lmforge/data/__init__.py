"""Training data: local files in LLaMA-Factory/OpenAI formats -> tokens with pre-shifted, masked labels -> rows.

- ``DataConfig`` / ``build_datasets(cfg, tokenizer) -> (train, val, report)``: the one entry point for the trainer.
- ``collate(batch, pad_id)``: right-padded int64 ``(B, T)`` ``tokens``, ``labels`` (-100), ``positions`` (-1) and, for
  packed rows, ``document_ids`` (-1).
- ``formats`` (reading and record formats), ``encode`` (labels and loss masks), ``packing`` (rows of documents).
"""
from lmforge.data.dataset import (DataConfig, DataReport, TokenizedDataset, build_datasets, check_bad_share,
                                  collate)
from lmforge.data.encode import IGNORE, Sample, assistant_spans, encode_conversations, encode_documents, fit_length
from lmforge.data.formats import Conversation, Document, Source, load_examples, parse_record, resolve_sources
from lmforge.data.packing import pack_samples, plan_rows

__all__ = [
    "DataConfig", "DataReport", "TokenizedDataset", "build_datasets", "check_bad_share", "collate",
    "IGNORE", "Sample", "assistant_spans", "encode_conversations", "encode_documents", "fit_length",
    "Conversation", "Document", "Source", "load_examples", "parse_record", "resolve_sources",
    "pack_samples", "plan_rows",
]
