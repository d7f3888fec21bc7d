"""Inference: sampling transforms, KV-cached generation and streaming (speculative decoding, prompt lookup,
draft training data from a model's own continuations, quantization, the batching engine and the server live
beside them).

    from llmlab.infer import generate, stream
"""

from llmlab.infer.generate import generate, stream
from llmlab.infer.sampling import probs_from_logits

__all__ = ["generate", "stream", "probs_from_logits"]
