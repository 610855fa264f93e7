"""tiny-cpu: a small numpy MLP classifier (64 -> 128 ReLU -> 10 softmax) for CPU-only runs.

The weights load once, at import: from the .npz file named by TINY_CPU_WEIGHTS (arrays `w1`
(64, 128), `b1` (128,), `w2` (128, 10), `b2` (10,)), else from a seeded random initialisation.
Request: `{"inputs": [[64 numbers], ...]}`; response: `{"predictions": [class per row],
"probabilities": [[10 per row], ...]}`, or 400 with `{"error": what to fix}`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np

INPUT_SIZE = 64
HIDDEN_SIZE = 128
CLASSES = 10
SEED = 0
SHAPES = {
    "w1": (INPUT_SIZE, HIDDEN_SIZE),
    "b1": (HIDDEN_SIZE,),
    "w2": (HIDDEN_SIZE, CLASSES),
    "b2": (CLASSES,),
}
EXAMPLE = '{"inputs": [[64 numbers], ...]}'


def load_weights(path: str | None) -> dict[str, np.ndarray]:
    """The model's weights from the .npz at `path`, or seeded random ones (He init) without it."""
    if not path:
        print(
            f"tiny-cpu: TINY_CPU_WEIGHTS is not set; using random weights (seed {SEED})",
            file=sys.stderr,
            flush=True,
        )
        rng = np.random.default_rng(SEED)
        return {
            "w1": rng.normal(0.0, math.sqrt(2 / INPUT_SIZE), SHAPES["w1"]).astype(np.float32),
            "b1": np.zeros(SHAPES["b1"], np.float32),
            "w2": rng.normal(0.0, math.sqrt(2 / HIDDEN_SIZE), SHAPES["w2"]).astype(np.float32),
            "b2": np.zeros(SHAPES["b2"], np.float32),
        }
    with np.load(path) as archive:
        missing = sorted(set(SHAPES) - set(archive.files))
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}")
        weights = {name: archive[name].astype(np.float32) for name in SHAPES}
    for name, shape in SHAPES.items():
        if weights[name].shape != shape:
            raise ValueError(f"{path}: {name} has shape {weights[name].shape}, expected {shape}")
    return weights


WEIGHTS = load_weights(os.environ.get("TINY_CPU_WEIGHTS"))


def predict(inputs: np.ndarray) -> np.ndarray:
    """Class probabilities, one row per input row."""
    hidden = np.maximum(inputs @ WEIGHTS["w1"] + WEIGHTS["b1"], 0.0)
    logits = hidden @ WEIGHTS["w2"] + WEIGHTS["b2"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def parse_inputs(body: bytes) -> np.ndarray:
    """The request's input rows as a (rows, 64) array; ValueError saying what to fix."""
    try:
        payload = json.loads(body)
    except ValueError:
        raise ValueError(f"the body is not JSON; send {EXAMPLE}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise ValueError(f'the body needs an "inputs" key: {EXAMPLE}')
    rows = payload["inputs"]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f'"inputs" must be a non-empty list of rows: {EXAMPLE}')
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != INPUT_SIZE:
            size = f"{len(row)} items" if isinstance(row, list) else type(row).__name__
            raise ValueError(f"inputs[{index}] must be a list of {INPUT_SIZE} numbers, not {size}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in row):
            raise ValueError(f"inputs[{index}] holds a value that is not a number")
    inputs = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(inputs).all():
        raise ValueError("inputs must be finite numbers (no NaN or Infinity)")
    return inputs


def handle(event: Any, context: Any) -> dict[str, Any]:
    """Classify each input row; 400 with an explanation for a malformed request."""
    try:
        inputs = parse_inputs(event.body)
    except ValueError as error:
        return {"statusCode": 400, "body": {"error": str(error)}}
    probabilities = predict(inputs)
    return {
        "statusCode": 200,
        "body": {
            "predictions": probabilities.argmax(axis=1).tolist(),
            "probabilities": probabilities.tolist(),
        },
    }
