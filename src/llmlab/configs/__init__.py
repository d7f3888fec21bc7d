"""Pretraining presets shipped with the package (also reachable as the top-level configs/ folder).

`llmlab pretrain --config NAME` accepts a preset name from here (tiny, cpu-demo, gpt2-124M) or a path.
"""
