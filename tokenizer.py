"""The tokenizer (tokenizer.json through the `tokenizers` library) and Qwen's ChatML prompt format."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


class Tokenizer:
    """`tokenizer.json` through the `tokenizers` library. Special tokens written in the text are recognised."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        try:
            self.tk = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path}: cannot read tokenizer ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)


def chatml(system: str, user: str, assistant_prefix: str = "") -> str:
    """Qwen's ChatML: system and user turns, then the assistant turn opened (and optionally prefilled)."""
    return (f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n"
            f"{IM_START}assistant\n{assistant_prefix}")
