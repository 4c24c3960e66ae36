"""kvserve: a KV-cache-centred LLM inference engine in plain PyTorch."""
import os
import sys

# THP_MEM_ALLOC_ENABLE=1 makes torch's CPU allocator put every tensor of 2 MiB or more (the weights, the
# KV pool) on transparent huge pages: fewer TLB misses while streaming weights and scattered KV blocks,
# ~7 % off a throughput run on the AVX2 machine. Why here, at import, and not in the CLI: torch reads the
# variable once, at its first allocation, i.e. during `import torch`; this package's import is the one
# point that every entry point (the `kvserve` console script, whose module import runs this file first,
# the server, the benchmarks, `from kvserve import LLM`) passes before torch. It changes performance
# only, never results; it is set only when torch is not loaded yet (later it would do nothing, so the
# environment is left alone), and never over a value the user chose (THP_MEM_ALLOC_ENABLE=0 opts out).
# The KV pool gets huge pages either way (kvserve/hugepages.py).
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from kvserve.llm import LLM  # noqa: E402
from kvserve.request import CompletionOutput, RequestOutput  # noqa: E402
from kvserve.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
