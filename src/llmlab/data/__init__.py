"""Data pipeline: text sources -> token shards -> batches.

- `sources`: documents from .txt/.jsonl/.parquet files, globs, directories or the built-in `stdlib` corpus.
"""

from llmlab.data.sources import describe_sources, iter_documents

__all__ = ["iter_documents", "describe_sources"]
