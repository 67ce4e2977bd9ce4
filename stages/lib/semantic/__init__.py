"""Semantic entropy: equivalence of answers by math, NLI or embeddings, clustering, and the entropies."""
