"""text-encoder: a transformer text encoder (torch's nn.TransformerEncoder) for GPU-sharing runs.

Written as the stock python3-http template expects, `handle(event, context)` only: the
runtime calls it on its handler threads, several requests at once, and does not batch them.
The model loads once, at import: in fp16 on CUDA when there is a GPU, else in fp32 on the CPU;
weights from the state_dict file named by TEXT_ENCODER_WEIGHTS (saved with torch.save), else
from a seeded random initialisation. One text encoded at import warms the model.
Request: UTF-8 text as the body (any bytes do), tokenised byte by byte; response:
`{"embedding": [...], "tokens": n, "truncated": bool}`, the unit-length mean of the encoder's
outputs, or 400 with `{"error": what to fix}`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

WIDTH = 1024  # the model's width; 16 heads of 64, feed-forward 4 x WIDTH
LAYERS = 12
MAX_TOKENS = 512  # longer texts are cut here
PAD, START = 0, 1  # token ids; byte b is token b + 2
VOCABULARY = 256 + 2
SEED = 0

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32


class TextEncoder(nn.Module):
    """Token and position embeddings, a pre-norm transformer encoder, the mean of its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCABULARY, WIDTH, padding_idx=PAD)
        self.positions = nn.Embedding(MAX_TOKENS, WIDTH)
        layer = nn.TransformerEncoderLayer(
            WIDTH,
            WIDTH // 64,
            4 * WIDTH,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, tokens) ids -> (batch, WIDTH) unit-length embeddings."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.norm(self.encoder(self.tokens(ids) + self.positions(positions)))
        return nn.functional.normalize(hidden.mean(dim=1).float(), dim=-1)


def load_model(path: str | None) -> nn.Module:
    """The encoder in eval mode on DEVICE: the state_dict at `path`, or seeded random weights."""
    if not path:
        print(
            f"text-encoder: TEXT_ENCODER_WEIGHTS is not set; using random weights (seed {SEED})",
            file=sys.stderr,
            flush=True,
        )
        torch.manual_seed(SEED)
    model = TextEncoder()
    if path:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().to(DEVICE, DTYPE)


def tokenise(text: bytes) -> tuple[list[int], bool]:
    """The token ids of `text` (START, then one per byte) cut to MAX_TOKENS, and whether it was
    cut; ValueError saying what to fix when it is empty."""
    if not text:
        raise ValueError("the body is empty; send the text to encode as the body")
    ids = [START] + [byte + 2 for byte in text]
    return ids[:MAX_TOKENS], len(ids) > MAX_TOKENS


def encode(ids: list[int]) -> list[float]:
    """The embedding of one tokenised text."""
    with torch.inference_mode():
        batch = torch.tensor([ids], device=DEVICE)
        return MODEL(batch)[0].tolist()  # .tolist() waits for the GPU


MODEL = load_model(os.environ.get("TEXT_ENCODER_WEIGHTS"))
encode(tokenise(b"warm up")[0])


def handle(event: Any, context: Any) -> dict[str, Any]:
    """Encode the text in the body; 400 with an explanation when there is none."""
    try:
        ids, truncated = tokenise(event.body)
    except ValueError as error:
        return {"statusCode": 400, "body": {"error": str(error)}}
    embedding = encode(ids)
    return {
        "statusCode": 200,
        "body": {"embedding": embedding, "tokens": len(ids), "truncated": truncated},
    }
