"""kvserve: a KV-cache-centred LLM inference engine in plain PyTorch."""
from kvserve.llm import LLM
from kvserve.request import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
