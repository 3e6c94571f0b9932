"""What the matrix products of the backends can ask of torch on a device."""

import functools

import torch


@functools.cache
def has_fp32_out_gemm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch has ``mm`` / ``addmm`` with ``out_dtype=torch.float32`` for ``dtype`` operands on this device
    type, as the backends call them: into a row-padded fp32 view (rowchunk's logits), accumulating in place into
    ``out`` (rowchunk's dW: torch 2.8 / 2.9 refuse an fp32 ``self`` with bf16 operands) and into a new tensor
    (the chunked and triton backends' dH). A low-precision product accumulated and returned in fp32, never rounded
    to the operands' dtype. Torch >= 2.10 has them on CUDA; CPU tensors (the interpreter's tests) do not."""
    try:
        ones = torch.ones(16, 16, dtype=dtype, device=device_type)
        padded = torch.zeros(16, 32, device=device_type)[:, :16]
        torch.mm(ones, ones, out_dtype=torch.float32, out=padded)
        out = torch.zeros(16, 16, device=device_type)
        torch.addmm(out, ones, ones, out_dtype=torch.float32, out=out)
        total = torch.addmm(out, ones, ones, out_dtype=torch.float32) + padded
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    if total.dtype != torch.float32:
        return False
    # 16 + 16 + 16 in every entry: the calls computed what they say (one host sync, once per process); the meta
    # device (allocation accounting) has no values, only the shapes and dtypes just checked
    return total.device.type == "meta" or bool(total.eq(48).all())
