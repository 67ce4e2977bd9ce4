"""Models: loading a causal LM and its tokenizer (Hub, local, GGUF), prompts, and the embedded toy model."""
