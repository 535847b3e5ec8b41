"""Chat messages -> prompt token ids, through the chat template of the checkpoint's tokenizer."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import HttpError


def chat_prompt_ids(tokenizer: Any, messages: tuple[dict[str, Any], ...]) -> list[int]:
    """Render with the generation prompt appended. The template's own special tokens (BOS)
    are part of its output, so the ids are used as they come, never tokenized twice."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise HttpError(400, "this model's tokenizer has no chat template; use /v1/completions",
                        param="messages", code="no_chat_template")
    try:
        out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # noqa: BLE001 - a template may raise anything (jinja raise_exception, KeyError)
        raise HttpError(400, f"messages: the model's chat template refused them ({exc})", param="messages") from None
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in ids]
