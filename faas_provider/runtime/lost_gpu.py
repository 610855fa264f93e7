"""Errors after which a process's GPU context cannot serve again.

CUDA reports them in its own words, which torch ("CUDA error: <words>"), CuPy and the driver
API pass on unchanged: an MPS client whose server died, refused it or terminated it, a device
that is gone, and the sticky errors (an illegal address, a failed launch, a device-side
assert, ...) that leave the context unusable until the process ends. A replica whose handler
raised one of them is not ready from then on, and is replaced. Errors that a later call may
not meet (out of memory, a bad argument) are not among them.
"""

from __future__ import annotations

import re

LOST_GPU = re.compile(
    "|".join(
        re.escape(words)
        for words in (
            # MPS: cudaErrorMpsConnectionFailed, ...RpcFailure, ...ServerNotReady,
            # ...ClientTerminated
            "MPS client failed to connect to the MPS control daemon or the MPS server",
            "the remote procedural call between the MPS server and the MPS client failed",
            "MPS server is not ready to accept new MPS client requests",
            "the MPS client has been terminated by the server",
            # the device: cudaErrorDevicesUnavailable, cudaErrorECCUncorrectable
            "CUDA-capable device(s) is/are busy or unavailable",
            "uncorrectable ECC error encountered",
            # sticky errors: cudaErrorIllegalAddress, ...LaunchTimeout, ...Assert,
            # ...HardwareStackError, ...IllegalInstruction, ...MisalignedAddress,
            # ...InvalidPc, ...LaunchFailure, ...ContextIsDestroyed
            "an illegal memory access was encountered",
            "the launch timed out and was terminated",
            "device-side assert triggered",
            "hardware stack error",
            "an illegal instruction was encountered",
            "misaligned address",
            "invalid program counter",
            "unspecified launch failure",
            "context is destroyed",
        )
    )
)


def lost_gpu(error: BaseException) -> str | None:
    """`Type: line` for the first line, of `error` or of what it was raised from, that says
    the GPU context is lost; None when none does."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if LOST_GPU.search(text):
            line = next(line for line in text.splitlines() if LOST_GPU.search(line))
            return f"{type(current).__name__}: {line.strip()}"
        current = current.__cause__ or current.__context__
    return None
