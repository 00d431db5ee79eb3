"""Shared fixtures: tiny offline checkpoints (built once per machine, cached) and a
small canonical dataset."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

# Keep tests single-threaded-friendly and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_path():
    from vlreason.models.tiny import tiny_model_path

    return tiny_model_path()


def png_bytes(color: str, size: tuple[int, int] = (112, 84)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def rows():
    return [
        {"id": "a", "images": [png_bytes("red")], "question": "What colour is the shape?", "answer": "red",
         "choices": [], "boxes": []},
        {"id": "b", "images": [png_bytes("blue", (64, 128)), png_bytes("green")], "question": "How many?",
         "answer": "2", "choices": [], "boxes": []},
    ]
