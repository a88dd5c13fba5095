"""An upper bound of a request's prompt tokens without a tokenizer.

Byte-level BPE tokenizers (OpenAI's, Anthropic's, Llama's ...) never make a token of less than one byte,
so the UTF-8 size of the prompt's JSON (which adds quotes, keys and brackets: the role and framing tokens
the model also sees) bounds its token count. Images are not text: each counts IMAGE_TOKEN_BOUND. The bound
is loose (about 4x for English prose); pass a counter (e.g. tiktoken's) to an integration for a tighter one.
"""

from __future__ import annotations

import json
from typing import Any

IMAGE_TOKEN_BOUND = 2_000  # a large image: OpenAI high detail and Anthropic both stay under this
_IMAGE_TYPES = {"image", "image_url", "input_image", "document", "file", "input_file", "input_audio"}


def _strip_media(value: Any, found: list[int]) -> Any:
    if isinstance(value, dict):
        if value.get("type") in _IMAGE_TYPES:
            found.append(1)
            return None
        return {k: _strip_media(v, found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strip_media(v, found) for v in value]
    if hasattr(value, "model_dump"):  # pydantic objects in a request (SDK param models)
        return _strip_media(value.model_dump(exclude_none=True), found)
    return value


def prompt_token_bound(*parts: Any) -> int:
    """Upper bound of the tokens of the given prompt parts (messages, system, tools, input ...)."""
    media: list[int] = []
    body = [_strip_media(p, media) for p in parts if p is not None]
    text = json.dumps(body, ensure_ascii=False, default=str)
    return len(text.encode("utf-8")) + IMAGE_TOKEN_BOUND * len(media)


__all__ = ["prompt_token_bound", "IMAGE_TOKEN_BOUND"]
