"""Scaling laws: FLOP accounting (flops), IsoFLOP sweeps of real runs (sweep), Kaplan and Chinchilla fits
(fit), and compute- and inference-optimal sizing (plan)."""
