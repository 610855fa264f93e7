"""gpu-alloc: allocates the number of gigabytes (10^9 bytes) in the body on the GPU, touches
them and frees them. It shows a function's GPU memory cap (fastgshare/gpu_mem) at work: past
the cap the allocation fails with CUDA's out-of-memory error, in this function alone."""

from __future__ import annotations

from typing import Any

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def handle(event: Any, context: Any) -> dict[str, Any]:
    """Allocate, fill and free `body` GB; 500 with the allocator's error when it fails."""
    try:
        gigabytes = float(event.body.decode() or "1")
    except ValueError:
        return {"statusCode": 400, "body": {"error": "send the gigabytes to allocate, e.g. 1.5"}}
    try:
        block = torch.ones(int(gigabytes * 1e9), dtype=torch.uint8, device=DEVICE)
        total = int(block[:: 1 << 20].sum())
        del block
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return {"statusCode": 500, "body": {"error": f"out of GPU memory: {error}"[:500]}}
    torch.cuda.empty_cache()
    return {"statusCode": 200, "body": {"allocated_gb": gigabytes, "checked": total}}
