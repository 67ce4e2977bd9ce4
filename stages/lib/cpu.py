"""The same bytes on every x86 CPU: the kernels numeric libraries pick by CPU, pinned, and the machine recorded.

``pin_cpu_kernels`` pins what the numeric libraries would otherwise choose by CPU; ``machine_record`` describes the
machine a stage ran on (its cost record).

torch's own kernels (ATen), MKL (torch's float matmuls), oneDNN, OpenBLAS (numpy's and scipy's: probe fitting),
numpy's own loops and numba (UMAP) each pick a kernel by the CPU's instruction set when they load (or compile for
it), and split work by its core count. A float sum done 16 lanes at a time instead of 8, with a fused multiply-add,
or over another number of threads rounds differently: an AVX2-only EPYC trained another toy model than this AVX-512
one, and every number downstream moved (issue 23). ``pin_cpu_kernels`` sets each library's own switch to the AVX2
level, which every x86 CPU since 2013 (Intel Haswell, AMD Zen) has, and a fixed thread count whatever the number of
cores. It must run before those libraries load: ``stages/__init__.py`` calls it, so ``python -m stages.<name>``
(what dvc.yaml runs) is pinned with no shell set-up, and the values override the caller's. A CPU without AVX2 and
FMA gets slower kernels that round differently; its cost records say so (``aten_capability`` is not AVX2).
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata

THREADS = 2
"""CPU threads of every library, fixed: a float sum split over another number of threads rounds differently.
Two, the cores of the machines the default run is measured on: a bigger machine runs no faster, a smaller one
oversubscribes."""

PINNED_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own kernels: vectorised loops, Sleef math, CPU attention
    "MKL_CBWR": "AVX2",  # MKL (torch's float matmuls): its AVX2 code branch, deterministic reductions
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (torch's mkldnn ops)
    "OPENBLAS_CORETYPE": "Haswell",  # numpy's and scipy's OpenBLAS (DYNAMIC_ARCH builds): the AVX2 kernels
    # numpy's AVX-512 loops (its exp/log/sum differ in the last bit from the AVX2 ones); unknown names are ignored
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512_SKX",
    "NUMBA_CPU_NAME": "haswell",  # numba (UMAP in analysis) compiles for this CPU, not the host: AVX2 code
    "OMP_NUM_THREADS": str(THREADS),  # torch's intra-op pool and scikit-learn's OpenMP loops
    "MKL_NUM_THREADS": str(THREADS),
    "OPENBLAS_NUM_THREADS": str(THREADS),
}
"""Each library's own switch; read when the library loads (MKL and oneDNN on their first call)."""

LIBRARIES = ("torch", "numpy", "scipy", "scikit-learn", "transformers", "tokenizers", "safetensors", "pandas",
             "pyarrow", "math-verify")
"""The packages whose version a cost record holds: what computes or writes the stages' numbers."""


def pin_cpu_kernels() -> list[str]:
    """Set ``PINNED_ENVIRONMENT`` in this process (and so in its children); return the libraries already loaded,
    which it comes too late for (empty for ``python -m stages.<name>``)."""
    os.environ.update(PINNED_ENVIRONMENT)
    return [name for name in ("torch", "numpy", "scipy") if name in sys.modules]


def cpu_description() -> dict[str, str]:
    """The CPU's model name and flags as Linux reports them (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        text = open("/proc/cpuinfo").read()  # noqa: SIM115 (one small read)
    except OSError:
        return {"cpu_model": platform.processor() or platform.machine(), "cpu_flags": ""}
    fields = dict(re.findall(r"^(model name|flags)\s*:\s*(.*)$", text, flags=re.MULTILINE))
    return {"cpu_model": fields.get("model name", platform.machine()), "cpu_flags": fields.get("flags", "")}


def machine_record() -> dict[str, str | int | None]:
    """What decides a stage's bytes besides its inputs: the CPU, the core count, the pinned switches as the process
    saw them, the kernels torch and the BLAS libraries actually chose, and the library versions."""
    record: dict[str, str | int | None] = dict(cpu_description())
    record["cores"] = os.cpu_count()
    record["platform"] = platform.platform()
    record["python"] = platform.python_version()
    for name in LIBRARIES:
        try:
            record[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            record[name] = None
    record["pinned"] = " ".join(f"{key}={os.environ.get(key)}" for key in PINNED_ENVIRONMENT)
    torch = sys.modules.get("torch")  # only when the stage loaded it: importing torch costs seconds
    if torch is not None:
        record["aten_capability"] = torch.backends.cpu.get_cpu_capability()
        record["torch_threads"] = torch.get_num_threads()
        found = re.search(r"Math Kernel Library Version (\S+)", torch.__config__.show())
        record["torch_blas"] = f"MKL {found.group(1)}" if found else "no MKL"
    if "numpy" in sys.modules:
        from threadpoolctl import threadpool_info

        record["blas"] = "; ".join(sorted({f"{info['prefix']} {info.get('version')} {info.get('architecture')} "
                                           f"x{info['num_threads']}" for info in threadpool_info()}))
    return record
