"""Helpers for tests and examples: tiny models saved with a working offline tokenizer."""

from __future__ import annotations

from pathlib import Path

from .tokenization import byte_tokenizer


def save_tiny_model(model, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
