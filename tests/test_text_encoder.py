"""The text-encoder sample's handler, called directly: text in, a unit-length embedding out,
400 for an empty body; several threads at once, as the runtime calls `handle`.

They need torch, and skip without it; with a GPU they run its CUDA path.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.conftest import import_handler

torch = pytest.importorskip("torch")

RANDOM_WEIGHTS_LINE = "text-encoder: TEXT_ENCODER_WEIGHTS is not set; using random weights (seed 0)"


@pytest.fixture(scope="module")
def loaded() -> tuple[ModuleType, str]:
    """The handler module, imported once without TEXT_ENCODER_WEIGHTS, and its stderr."""
    return import_handler("text-encoder", "TEXT_ENCODER_WEIGHTS")


@pytest.fixture
def handler(loaded: tuple[ModuleType, str]) -> ModuleType:
    return loaded[0]


def call(handler: ModuleType, body: bytes) -> dict[str, Any]:
    return handler.handle(SimpleNamespace(body=body, headers={}, method="POST"), None)


def test_random_weights_are_said_once(loaded: tuple[ModuleType, str]) -> None:
    assert loaded[1].strip() == RANDOM_WEIGHTS_LINE


def test_a_text_gets_a_unit_length_embedding(handler: ModuleType) -> None:
    answer = call(handler, "Grüße, GPU".encode())
    assert answer["statusCode"] == 200
    body = answer["body"]
    assert len(body["embedding"]) == handler.WIDTH
    assert math.fsum(x * x for x in body["embedding"]) == pytest.approx(1.0, abs=1e-3)
    assert (body["tokens"], body["truncated"]) == (1 + len("Grüße, GPU".encode()), False)


def test_tokens_are_bytes_after_a_start_token_cut_at_the_limit(handler: ModuleType) -> None:
    assert handler.tokenise(b"AB") == ([handler.START, 65 + 2, 66 + 2], False)
    ids, truncated = handler.tokenise(b"x" * handler.MAX_TOKENS)
    assert (len(ids), truncated) == (handler.MAX_TOKENS, True)


def test_an_empty_body_is_400_saying_what_to_send(handler: ModuleType) -> None:
    answer = call(handler, b"")
    assert answer["statusCode"] == 400
    assert "send the text" in answer["body"]["error"]


def test_threads_at_once_get_what_one_alone_gets(handler: ModuleType) -> None:
    texts = [f"request {index}".encode() for index in range(8)]
    alone = [call(handler, text)["body"]["embedding"] for text in texts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda text: call(handler, text)["body"]["embedding"], texts))
    for one, other in zip(alone, together, strict=True):
        assert one == pytest.approx(other, abs=1e-2)
    assert alone[0] != pytest.approx(alone[1], abs=1e-3), "different texts, different embeddings"
