"""gpu-fault: a GPU function that can be told to crash its GPU context, for fault drills.

A body of `fault` launches a kernel that writes to an invalid address: a fatal GPU error,
which the MPS server reports to every client of that GPU. Any other body runs a small matrix
product and answers 200.
"""

from __future__ import annotations

from typing import Any

import cupy
import torch

WORK = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
_WILD_WRITE = cupy.RawKernel(
    r"""
    extern "C" __global__ void wild_write() {
        *((volatile int *) 0x10) = 1;
    }
    """,
    "wild_write",
)


def handle(event: Any, context: Any) -> dict[str, Any]:
    """Crash the GPU context on `fault`, else do a little GPU work."""
    if event.body == b"fault":
        _WILD_WRITE((1,), (1,), ())
        cupy.cuda.Device().synchronize()
    value = float((WORK @ WORK).sum())
    return {"statusCode": 200, "body": {"sum": value}}
