"""Sampling: K runs per question from the transformers or vLLM backend, their run records, and resumable checkpoints."""
