"""Evaluations of checkpoints: perplexity on held-out shards (perplexity.py), and the task evals beside it.

    from llmlab.evals.perplexity import perplexity, evaluate_checkpoints
"""
