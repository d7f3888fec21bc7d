"""The model: ModelConfig (shapes and presets), Transformer (GPT-2 / Llama flavours), KVCache for decoding.

    from llmlab.model import ModelConfig, Transformer
    model = Transformer(ModelConfig.preset("llama", "mini", vocab_size=tok.vocab_size))
    logits = model(idx)                      # [B, T] -> [B, T, vocab]
    model.save("ckpt"); Transformer.load("ckpt")
"""

from llmlab.model.config import ModelConfig
from llmlab.model.kv_cache import KVCache
from llmlab.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache"]
