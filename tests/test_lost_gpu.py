"""Which errors say that a replica's GPU context is lost (runtime/lost_gpu.py)."""

from __future__ import annotations

import pytest

from faas_provider.runtime.lost_gpu import lost_gpu


class AcceleratorError(RuntimeError):
    """torch's class for CUDA errors (torch.AcceleratorError), by name."""


@pytest.mark.parametrize(
    "text",
    [
        # torch, after its MPS server died, when it cannot reach one, or after a fault
        "CUDA error: the remote procedural call between the MPS server and the MPS client failed",
        "CUDA error: MPS client failed to connect to the MPS control daemon or the MPS server",
        "Error 807: MPS server is not ready to accept new MPS client requests",
        "CUDA error: CUDA-capable device(s) is/are busy or unavailable",
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: unspecified launch failure",
        "CUDA error: device-side assert triggered",
        # CuPy
        "cudaErrorIllegalAddress: an illegal memory access was encountered",
    ],
)
def test_errors_that_leave_the_context_unusable(text: str) -> None:
    error = AcceleratorError(f"{text}\nCUDA kernel errors might be asynchronously reported")
    assert lost_gpu(error) == f"AcceleratorError: {text}"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.79 GiB"),
        RuntimeError("CUDA error: invalid argument"),
        ValueError("send the bytes of a JPEG or PNG image as the body"),
    ],
)
def test_errors_a_later_call_may_not_meet(error: Exception) -> None:
    assert lost_gpu(error) is None


def test_an_error_raised_from_a_lost_context_counts() -> None:
    try:
        try:
            raise AcceleratorError("CUDA error: unspecified launch failure")
        except AcceleratorError as cause:
            raise ValueError("classification failed") from cause
    except ValueError as error:
        assert lost_gpu(error) == "AcceleratorError: CUDA error: unspecified launch failure"
