"""Experiments: one module per `llmlab experiment NAME`, each composing the library into a sweep or a
comparison that writes report.md + JSON + PNG, with a smoke size the tests run."""
