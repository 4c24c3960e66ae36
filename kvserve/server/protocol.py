"""The OpenAI wire format, as pydantic models: completions, chat completions, models, errors.

Requests ignore unknown fields (clients send newer OpenAI fields we do not know); the extras that
vLLM accepts (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ``skip_special_tokens``) are accepted here too. Bounds on a field live in its
``Field`` so they show in /openapi.json; what only a SamplingParams can judge is checked there.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20  # as vLLM's default max_logprobs
MAX_N = 128


class _Model(BaseModel):
    # NaN and inf parse from JSON through Python's json module: never let them reach the sampler.
    model_config = ConfigDict(allow_inf_nan=False)


# ---------------------------------------------------------------------- errors
class ErrorInfo(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Model):
    error: ErrorInfo


# ---------------------------------------------------------------------- shared request fields
class StreamOptions(_Model):
    include_usage: bool | None = False


class SamplingFields(_Model):
    model: str | None = Field(None, description="the served model name; the default model when absent")
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off")
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    context_overflow: Literal["error", "truncate", "shift"] = Field(
        "error", description="a prompt or generation past the context: refuse / stop (error), keep the prompt's "
                             "last tokens (truncate), or llama.cpp's context shift (shift)")
    kv_compression: str | dict | None = Field(
        None, description="compress this request's KV cache after its prefill: {\"method\": \"snapkv\", \"ratio\": 0.5} "
                          "or \"snapkv:0.5\" (methods: snapkv, streaming_llm, knorm, tova; ratio = fraction removed)")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be absent or empty")
    user: str | None = None


# ---------------------------------------------------------------------- completions
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string, a list of strings, a list of token ids, or a list of those")
    max_tokens: int | None = Field(None, ge=1, description="default 16, and never past the context length")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = Field(None, description="not supported: must be absent")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only best_of == n is supported")


class CompletionLogprobs(_Model):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class PromptTokensDetails(_Model):
    cached_tokens: int = 0


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------- chat completions
class ContentPart(_Model):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI: use max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[dict] | None = Field(None, description="not supported: must be absent or empty")
    response_format: dict | None = Field(None, description="only {'type': 'text'} is supported")


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Model):
    content: list[ChatLogprobToken] | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Model):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(_Model):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------- models
class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
