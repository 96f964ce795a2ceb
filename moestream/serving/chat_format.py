"""Chat messages -> prompt text, shared by `moestream serve` and `moestream chat`: the store's
own chat template where it carries one (transformers' apply_chat_template), else a plain
"role: content" transcript ending in "assistant:"."""
from __future__ import annotations

from typing import Any, Callable, Optional

ChatTemplate = Callable[[list[dict[str, str]]], str]


def plain_transcript(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def chat_template_of(store_path: str) -> Optional[ChatTemplate]:
    """The store's chat template as messages -> text, or None when the store carries none or
    transformers is not installed."""
    try:
        from ..integrations.transformers import load_tokenizer
        tok = load_tokenizer(store_path)
    except Exception:
        return None
    if not getattr(tok, "chat_template", None):
        return None
    return lambda messages: tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def format_chat(messages: list[dict[str, Any]], template: Optional[ChatTemplate]) -> str:
    return template(messages) if template else plain_transcript(messages)
