"""resnet50: an ImageNet classifier, torchvision's ResNet-50, for GPU-sharing runs.

The model loads once, at import: in fp16 and channels_last on CUDA when there is a GPU, else
in fp32 on the CPU; weights from the state_dict file named by RESNET50_WEIGHTS (saved with
torch.save), else from a seeded random initialisation. One forward pass at import warms it.
Request: a JPEG or PNG image as the body; response: `{"top5": [{"class": index, "label": name,
"probability": p}, ...]}`, most probable first, or 400 with `{"error": what to fix}`.
Resizing runs on the GPU. fast-gshare's runtime calls `handle_batch` with the requests that
arrived together and classifies them in one forward pass; `handle` serves one request where a
runtime knows only that. RESNET50_BATCH=N (default 1) runs each image as N copies, to make a
request saturate a GPU share in sharing experiments.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import torch
from torch import nn
from torchvision.io import ImageReadMode, decode_image
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.transforms.v2 import functional as tf

RESIZE = 256
CROP = 224
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
TOP_K = 5
SEED = 0
CATEGORIES: list[str] = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
# torchvision prefixes its decoders' errors with "function, file.cpp:line, ".
SOURCE_PREFIX = re.compile(r"^[^,]*, \S+:\d+, ")
SEND = "send the bytes of a JPEG or PNG image as the body"

BATCH = int(os.environ.get("RESNET50_BATCH", "1"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32


def load_model(path: str | None) -> nn.Module:
    """ResNet-50 in eval mode on DEVICE, from the state_dict at `path` or seeded random weights."""
    if path:
        model = resnet50()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        print(
            f"resnet50: RESNET50_WEIGHTS is not set; using random weights (seed {SEED})",
            file=sys.stderr,
            flush=True,
        )
        torch.manual_seed(SEED)
        model = resnet50()
    return model.eval().to(DEVICE, DTYPE, memory_format=torch.channels_last)


def preprocess(body: bytes) -> torch.Tensor:
    """The image in `body` as BATCH normalised (3, 224, 224) copies on DEVICE; ValueError
    saying what to fix when it is not a JPEG or PNG image."""
    if not body:
        raise ValueError(f"the body is empty; {SEND}")
    kind = next((name for magic, name in SIGNATURES.items() if body.startswith(magic)), None)
    if kind is None:
        raise ValueError(f"the body is not a JPEG or PNG image; {SEND}")
    data = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    try:
        image = decode_image(data, ImageReadMode.RGB)
    except RuntimeError as error:
        reason = SOURCE_PREFIX.sub("", str(error))
        raise ValueError(f"the {kind} image cannot be decoded ({reason}); {SEND}") from None
    image = image.to(DEVICE)
    image = tf.center_crop(tf.resize(image, [RESIZE], antialias=True), [CROP, CROP])
    batch = tf.to_dtype(image.unsqueeze(0), torch.float32, scale=True)
    batch = tf.normalize(batch, MEAN, STD).expand(BATCH, -1, -1, -1)
    return batch.to(DTYPE).contiguous(memory_format=torch.channels_last)


def classify(batch: torch.Tensor) -> list[list[dict[str, Any]]]:
    """The TOP_K most probable ImageNet classes of every BATCH-th image in `batch` (one list
    per image that `preprocess` gave)."""
    with torch.inference_mode():
        probabilities = MODEL(batch)[::BATCH].float().softmax(dim=1)
        top = probabilities.topk(TOP_K, dim=1)
    return [
        [
            {"class": index, "label": CATEGORIES[index], "probability": probability}
            for probability, index in zip(values, indices, strict=True)
        ]
        for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


MODEL = load_model(os.environ.get("RESNET50_WEIGHTS"))
classify(torch.zeros(BATCH, 3, CROP, CROP, device=DEVICE, dtype=DTYPE))


def handle_batch(events: list[Any], context: Any) -> list[dict[str, Any]]:
    """Classify the image in each event's body, all in one forward pass; 400 with an
    explanation for a body that is not an image."""
    answers: list[dict[str, Any]] = [{} for _ in events]
    images: dict[int, torch.Tensor] = {}
    for position, event in enumerate(events):
        try:
            images[position] = preprocess(event.body)
        except ValueError as error:
            answers[position] = {"statusCode": 400, "body": {"error": str(error)}}
    if images:
        batch = torch.cat(list(images.values())).contiguous(memory_format=torch.channels_last)
        top5s = classify(batch)
        for position, top5 in zip(images, top5s, strict=True):
            answers[position] = {"statusCode": 200, "body": {"top5": top5}}
    return answers


def handle(event: Any, context: Any) -> dict[str, Any]:
    """Classify the image in the body; 400 with an explanation when it is not one."""
    return handle_batch([event], context)[0]
