"""Probes: the joined dataset and its split, the linear probes, their fit and selection, and their files."""
