"""Shared fixtures: tiny offline checkpoints (built once per machine, cached) and a
small canonical dataset."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

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

@pytest.fixture
def tiny_fs(tmp_path):
    """``mount(size_kib)``: a fresh tmpfs of that size (skips where mount is refused)."""
    mounted: list[Path] = []

    def mount(size_kib: int) -> Path:
        if os.name != "posix" or shutil.which("mount") is None:
            pytest.skip("needs mount(8) to build a size-limited tmpfs; the patched-writer tests cover this")
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a size-limited tmpfs is not permitted here ({done.stderr.strip()}); "
                        "the patched-writer tests cover this")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
