"""Data pipeline: text sources -> token shards -> batches.

- `sources`: documents from .txt/.jsonl/.parquet files, globs, directories or the built-in `stdlib` corpus.
- `shards`: the shard file format (header + uint16/uint32 tokens), `write_shard` / `read_shard`.
- `prepare`: `prepare_shards`, the parallel, resumable tokenization behind `llmlab data prepare`.
- `loader`: `TokenLoader`, deterministic rank-aware batches with an exact resume position.

Names are imported lazily so that tokenizer worker processes and `llmlab --help` do not pay for torch.
"""

__all__ = ["iter_documents", "describe_sources", "prepare_shards", "write_shard", "read_shard",
           "describe_shards", "TokenLoader"]

_LAZY = {
    "iter_documents": "llmlab.data.sources", "describe_sources": "llmlab.data.sources",
    "prepare_shards": "llmlab.data.prepare", "write_shard": "llmlab.data.shards",
    "read_shard": "llmlab.data.shards", "describe_shards": "llmlab.data.shards",
    "TokenLoader": "llmlab.data.loader",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmlab.data' has no attribute {name!r}")
