"""The pipeline's stages, one module per dvc.yaml stage (``python -m stages.<name>``), and their library (lib/).

Importing the package pins the kernels the numeric libraries would otherwise choose by CPU, before any of them loads
(stages/lib/cpu.py), so every stage gives the same bytes on every x86 machine with AVX2."""

from stages.lib.cpu import pin_cpu_kernels

pin_cpu_kernels()
