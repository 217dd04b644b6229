"""Shared fixtures: the real default model once per session, tiny random models on demand."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Up to 2 torch threads, shared among pytest-xdist's workers (`make test` runs 2: one thread each)
TORCH_THREADS = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(TORCH_THREADS)

# 64 tokens of ordinary English (with BOS) on SmolLM2: the acceptance text for the sink measurement.
ENGLISH_64 = (
    "The old library stood at the end of a narrow street, its windows glowing in the evening light. "
    "Inside, a woman sorted letters that had arrived from distant towns, reading each address twice "
    "before she placed it on the shelf. Outside, the rain began to fall softly. A grey cat slept by the warm stove."
)


@pytest.fixture(scope="session")
def smollm2():
    from attnlab.probe import load

    return load("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tiny_models():
    from attnlab.probe import load

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load(name, device="cpu")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def english_64() -> str:
    return ENGLISH_64
