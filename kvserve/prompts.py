"""What every front end (``LLM``, the CLI, the HTTP server) does to a prompt before the engine sees it,
and to the output text before a client sees it. One function each, so the paths cannot drift apart:

* ``as_prompt_list`` / ``normalize_prompt``: one prompt or a batch; a string, a list of token ids or
  ``{"prompt": ..., "prompt_token_ids": ...}`` -> ``(text, token ids)``
* ``encode_chat``: messages -> the model's chat template -> ``(text, token ids)``; the template holds the
  special tokens, so its text is tokenized without adding them again
* ``find_stop`` / ``stable_text``: where a stop string cuts a growing text, and the part of that text no
  later token can change (the hold-back), so streamed text never has to be taken back
"""
from __future__ import annotations

from typing import Sequence

PromptType = str | list[int] | dict


# ---------------------------------------------------------------------- prompts
def as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt or a batch of them -> a list of prompts. A list of ints is one prompt."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts


def encode_text(tokenizer, text: str) -> list[int]:
    """A text prompt's token ids, with the special tokens the tokenizer adds (BOS for Llama-style models)."""
    try:
        return tokenizer.encode(text)
    except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate, which JSON allows and UTF-8 does not
        raise ValueError(f"the prompt cannot be tokenized: {type(e).__name__}") from e


def normalize_prompt(prompt: PromptType | None, tokenizer,
                     prompt_token_ids: list[int] | None = None) -> tuple[str | None, list[int]]:
    """``(text or None, token ids)`` of one prompt: a string (tokenized), a list of token ids, or a dict
    with ``prompt`` and/or ``prompt_token_ids``. Token ids given (in the dict or as ``prompt_token_ids``)
    win over the text, which then only labels the request. The ids are not checked here: see
    ``LLMEngine.check_prompt``."""
    if isinstance(prompt, dict):
        text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        if text is None and ids is None:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    elif prompt is None or isinstance(prompt, str):
        text, ids = prompt, None
    else:
        text, ids = None, prompt
    if prompt_token_ids is not None:
        ids = prompt_token_ids
    if ids is None:
        if text is None:
            raise ValueError("a request needs a prompt or prompt_token_ids")
        ids = encode_text(tokenizer, text)
    return text, list(ids)


# ---------------------------------------------------------------------- chat
def truncate_room(max_tokens: int | None, max_model_len: int) -> int:
    """context_overflow="truncate": the room a too-long prompt leaves for generation when cut to its
    last tokens (max_tokens, at most half the context)."""
    return min(max_tokens or max_model_len, max_model_len // 2)


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as text, through the model's chat template (Jinja only: safe off the engine thread)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template may raise anything on odd conversations
        raise ValueError(f"the chat template cannot render these messages: {e}") from e


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """``(text, token ids)`` of a conversation through the chat template. The template already holds the
    special tokens (BOS, role markers): tokenizing its text must not add them a second time."""
    text = apply_chat_template(tokenizer, messages, add_generation_prompt)
    try:
        return text, tokenizer.encode(text, add_special_tokens=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"the prompt cannot be tokenized: {type(e).__name__}") from e


# ---------------------------------------------------------------------- stop strings
def find_stop(text: str, stop: Sequence[str], prev_len: int = 0) -> tuple[int, str] | None:
    """``(index, stop string)`` of the first stop string in ``text``, or None. ``prev_len``: the length of
    the text already searched; only its last ``len(stop) - 1`` characters can begin a new match."""
    if not stop:
        return None
    start = max(0, prev_len - max(len(s) for s in stop))
    hits = [(i, s) for s in stop if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def stable_text(text: str, stop: Sequence[str] = (), finished: bool = False) -> str:
    """The part of a growing output text that later tokens cannot change: all of it once finished; before
    that, without a trailing half of a multi-byte character (U+FFFD until its last byte comes) and without
    the last ``len(longest stop) - 1`` characters, which may begin a stop string that will be cut out.
    So each cumulative text is a prefix of the final one, and streamed deltas never need taking back."""
    if finished:
        return text
    if stop:
        text = text[: max(0, len(text) - (max(len(s) for s in stop) - 1))]
    return text.rstrip("\ufffd")
