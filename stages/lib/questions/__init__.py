"""Questions: the in-distribution and OOD sources, the toy arithmetic task, and answer extraction and checking."""
