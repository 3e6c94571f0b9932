"""What the matrix products of the backends can ask of torch on a device."""

import functools

import torch


@functools.cache
def has_fp32_out_gemm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch has ``mm`` / ``addmm`` with ``out_dtype=torch.float32`` for ``dtype`` operands on this device
    type: a low-precision product accumulated and returned in fp32, never rounded to the operands' dtype."""
    try:
        ones = torch.ones(16, 16, dtype=dtype, device=device_type)
        torch.mm(ones, ones, out_dtype=torch.float32, out=torch.empty(16, 16, device=device_type))
        torch.addmm(torch.zeros(16, 16, device=device_type), ones, ones, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True
