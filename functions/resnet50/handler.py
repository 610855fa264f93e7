"""resnet50: an ImageNet classifier, torchvision's ResNet-50, for GPU-sharing runs.

The model loads once, at import: in fp16 and channels_last on CUDA when there is a GPU, else
in fp32 on the CPU; weights from the state_dict file named by RESNET50_WEIGHTS (saved with
torch.save), else from a seeded random initialisation. A batch of images runs padded to the
next power of two up to the runtime's `max_batch_size` (default 8: 1, 2, 4, 8), and at import
one batch of each size is decoded and classified, which warms the decoders and the model. On
CUDA each batch size's forward pass is captured once as a CUDA graph and replayed.
Request: a JPEG or PNG image as the body; response: `{"top5": [{"class": index, "label": name,
"probability": p}, ...]}`, most probable first, or 400 with `{"error": what to fix}`.
On a GPU, JPEGs are decoded there (nvJPEG, a batch at once) and every image is resized
there, which leaves the CPU, shared by the replicas on that GPU, little to do. fast-gshare's
runtime calls `handle_batch` with the requests that arrived together and classifies them in one
forward pass; `handle` serves one request where a runtime knows only that. RESNET50_BATCH=N
(default 1) runs each image as N copies, to make a request saturate a GPU share in sharing
experiments. RESNET50_GPU_WAIT says how a replica waits for its forward pass: `block` (the
default) sleeps until the GPU signals, `spin` polls the GPU on a CPU core, a little sooner
but holding that core, which the other replicas of a shared GPU need.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from typing import Any

import torch
from torch import nn
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_jpeg
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
LARGEST_BATCH = int(os.environ.get("max_batch_size") or 8)  # the runtime's largest batch
GPU_WAITS = {"spin": False, "block": True}  # RESNET50_GPU_WAIT -> a blocking CUDA event
GPU_WAIT = os.environ.get("RESNET50_GPU_WAIT", "block")
if GPU_WAIT not in GPU_WAITS:
    raise ValueError(f"RESNET50_GPU_WAIT is {GPU_WAIT!r}; set it to one of {', '.join(GPU_WAITS)}")
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


def image_kind(body: bytes) -> str:
    """The body's image format, JPEG or PNG, from its first bytes; ValueError saying what to fix
    when it is neither."""
    if not body:
        raise ValueError(f"the body is empty; {SEND}")
    kind = next((name for magic, name in SIGNATURES.items() if body.startswith(magic)), None)
    if kind is None:
        raise ValueError(f"the body is not a JPEG or PNG image; {SEND}")
    return kind


def decode_on_cpu(body: bytes, kind: str) -> torch.Tensor:
    """The `kind` image in `body` as a uint8 (3, H, W) RGB tensor on the CPU; ValueError naming
    the decoder's complaint when it cannot be decoded."""
    try:
        return decode_image(torch.frombuffer(bytearray(body), dtype=torch.uint8), ImageReadMode.RGB)
    except RuntimeError as error:
        reason = SOURCE_PREFIX.sub("", str(error))
        raise ValueError(f"the {kind} image cannot be decoded ({reason}); {SEND}") from None


def decode_on_gpu(bodies: list[bytes]) -> list[torch.Tensor | None]:
    """The JPEG images in `bodies` as uint8 (3, H, W) RGB tensors on DEVICE, decoded together
    by nvJPEG; None for each one it cannot decode."""
    data = [torch.frombuffer(bytearray(body), dtype=torch.uint8) for body in bodies]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=DEVICE))
    except RuntimeError:  # one JPEG it cannot decode fails them all: each alone, then
        if len(bodies) == 1:
            return [None]
        return [image for body in bodies for image in decode_on_gpu([body])]


def decode(bodies: list[bytes]) -> list[torch.Tensor | ValueError]:
    """Each body's image as a uint8 (3, H, W) RGB tensor on DEVICE, or the ValueError that says
    what is wrong with it. On CUDA the JPEGs are decoded together on the GPU, which spares the
    CPU that the replicas sharing a GPU also share; PNGs, and JPEGs that the GPU decoder
    refuses, are decoded on the CPU, whose decoder names what is wrong."""
    decoded: dict[int, torch.Tensor | ValueError] = {}
    pending: dict[int, str] = {}  # position -> kind of the images still to decode
    for position, body in enumerate(bodies):
        try:
            pending[position] = image_kind(body)
        except ValueError as error:
            decoded[position] = error
    jpegs = [position for position, kind in pending.items() if kind == "JPEG"]
    if DEVICE.type == "cuda" and jpegs:
        for position, image in zip(jpegs, decode_on_gpu([bodies[p] for p in jpegs]), strict=True):
            if image is not None:
                decoded[position] = image
                del pending[position]
    for position, kind in pending.items():
        try:
            decoded[position] = decode_on_cpu(bodies[position], kind).to(DEVICE)
        except ValueError as error:
            decoded[position] = error
    return [decoded[position] for position in range(len(bodies))]


def batch_sizes(largest: int) -> list[int]:
    """The batch sizes the model runs: the powers of two below `largest`, and `largest`."""
    return [1 << power for power in range(largest.bit_length()) if 1 << power < largest] + [largest]


SIZES = batch_sizes(LARGEST_BATCH)


def crop(images: list[torch.Tensor]) -> torch.Tensor:
    """Decoded images as one uint8 (N, 3, 224, 224) channels_last batch: each resized (shorter
    side 256) and center-cropped, the images of one size resized together."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(position)
    crops = torch.empty(
        (len(images), 3, CROP, CROP), dtype=torch.uint8, device=images[0].device
    ).contiguous(memory_format=torch.channels_last)
    for positions in by_shape.values():
        same = torch.stack([images[position] for position in positions])
        crops[positions] = tf.center_crop(tf.resize(same, [RESIZE], antialias=True), [CROP, CROP])
    return crops


# Normalising is (x / 255 - mean) / std per channel: one multiply-add, x * SCALE + SHIFT.
SCALE = (1 / (255 * torch.tensor(STD))).view(1, 3, 1, 1).to(DEVICE, DTYPE)
SHIFT = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1).to(DEVICE, DTYPE)


def prepare(images: list[torch.Tensor]) -> torch.Tensor:
    """Decoded images as one batch for the model: cropped (`crop`), padded with copies of the
    last one to the next of SIZES (the sizes warmed up), normalised, BATCH copies of each,
    DTYPE, channels_last."""
    crops = crop(images)
    padding = next((size for size in SIZES if size >= len(crops)), len(crops)) - len(crops)
    if padding:
        crops = torch.cat([crops, crops[-1:].expand(padding, -1, -1, -1)])
    batch = torch.addcmul(SHIFT, crops.to(DTYPE), SCALE).repeat_interleave(BATCH, dim=0)
    return batch.contiguous(memory_format=torch.channels_last)


def preprocess(body: bytes) -> torch.Tensor:
    """The image in `body` as a batch of BATCH normalised (3, 224, 224) copies on DEVICE;
    ValueError saying what to fix when it is not a JPEG or PNG image."""
    (image,) = decode([body])
    if isinstance(image, ValueError):
        raise image
    return prepare([image])


def top_k(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The TOP_K probabilities and classes of every BATCH-th image in `batch`, on DEVICE."""
    probabilities = MODEL(batch)[::BATCH].float().softmax(dim=1)
    values, indices = probabilities.topk(TOP_K, dim=1)
    return values, indices


class GraphedTopK:
    """`top_k` for each batch size, captured once as a CUDA graph. A replay launches the whole
    forward pass at once, where eager mode launches each of its ~250 kernels from Python,
    holding the interpreter lock that the runtime's HTTP server needs too; the wait for the
    GPU releases it. One batch at a time: a graph's input and outputs are fixed buffers."""

    def __init__(self, sizes: list[int]) -> None:
        self._graphs: dict[
            int, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, ...]]
        ] = {}
        self._lock = threading.Lock()
        self._done = torch.cuda.Event(blocking=GPU_WAITS[GPU_WAIT])
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for size in sorted(sizes, reverse=True):  # the largest first: the others reuse its memory
            static = torch.zeros((size * BATCH, 3, CROP, CROP), dtype=DTYPE, device=DEVICE)
            static = static.contiguous(memory_format=torch.channels_last)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # cuDNN chooses its algorithms outside the capture
                    top_k(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                outputs = top_k(static)
            self._graphs[size * BATCH] = (graph, static, outputs)

    def __call__(self, batch: torch.Tensor) -> tuple[list[list[float]], list[list[int]]] | None:
        """The probabilities and classes of `batch`, or None when no graph has its size."""
        captured = self._graphs.get(batch.shape[0])
        if captured is None:
            return None
        graph, static, (values, indices) = captured
        with self._lock:
            static.copy_(batch)
            graph.replay()
            self._done.record()
            self._done.synchronize()  # without the interpreter lock
            return values.tolist(), indices.tolist()


def classify(batch: torch.Tensor) -> list[list[dict[str, Any]]]:
    """The TOP_K most probable ImageNet classes of every BATCH-th image in `batch`: one list
    per image given to `prepare`, in order, then one per padding copy."""
    with torch.inference_mode():
        found = GRAPHS(batch) if GRAPHS is not None else None
        if found is None:
            values, indices = top_k(batch)
            found = values.tolist(), indices.tolist()
    return [
        [
            {"class": index, "label": CATEGORIES[index], "probability": probability}
            for probability, index in zip(values, indices, strict=True)
        ]
        for values, indices in zip(*found, strict=True)
    ]


def warm_up() -> None:
    """Decode and classify a batch of each of SIZES, so that no request pays for a batch
    size's first run (kernel loading, algorithm choice: about 0.1 s each) under load."""
    began = time.monotonic()
    body = encode_jpeg(torch.zeros(3, CROP, CROP, dtype=torch.uint8)).numpy().tobytes()
    for size in SIZES:
        images = decode([body] * size)
        classify(prepare([image for image in images if isinstance(image, torch.Tensor)]))
    sizes = ", ".join(map(str, SIZES))
    print(f"resnet50: warmed up batches of {sizes} images in {time.monotonic() - began:.2f} s",
          file=sys.stderr, flush=True)  # fmt: skip


MODEL = load_model(os.environ.get("RESNET50_WEIGHTS"))
GRAPHS = GraphedTopK(SIZES) if DEVICE.type == "cuda" else None
warm_up()


def handle_batch(events: list[Any], context: Any) -> list[dict[str, Any]]:
    """Classify the image in each event's body, all in one forward pass; 400 with an
    explanation for a body that is not an image."""
    images = decode([event.body for event in events])
    answers: list[dict[str, Any]] = [
        {"statusCode": 400, "body": {"error": str(image)}} if isinstance(image, ValueError) else {}
        for image in images
    ]
    good = [position for position, image in enumerate(images) if not isinstance(image, ValueError)]
    if good:
        top5s = classify(prepare([images[position] for position in good]))[: len(good)]
        for position, top5 in zip(good, top5s, strict=True):
            answers[position] = {"statusCode": 200, "body": {"top5": top5}}
    return answers


def handle(event: Any, context: Any) -> dict[str, Any]:
    """Classify the image in the body; 400 with an explanation when it is not one."""
    return handle_batch([event], context)[0]
