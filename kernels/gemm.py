"""Matrix products of the backends: what torch offers on a device (the fp32-output probe) and the products
formed with it, accumulated in fp32 and rounded once."""

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


def _wide(out: torch.Tensor) -> torch.dtype:
    """The dtype a fallback product is formed in: ``out``'s, at least fp32."""
    return torch.promote_types(out.dtype, torch.float32)


def product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """out <- a @ b, or out <- out + a @ b in place with ``accumulate``: accumulated in fp32 at least and rounded
    once into ``out``'s dtype. One GEMM when the dtypes agree, or, for low-precision operands and an fp32 ``out``,
    where torch has the ``out_dtype`` GEMM; elsewhere (CPU tensors: the tests) the product of upcast operands."""
    if a.dtype == b.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if a.dtype == b.dtype and has_fp32_out_gemm(out.device.type, a.dtype):
        if accumulate:
            return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    product = a.to(_wide(out)) @ b.to(_wide(out))
    return out.add_(product) if accumulate else out.copy_(product)


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Returns acc + a @ b for an ``acc`` at least as wide as the operands: in place when the dtypes agree; else one
    GEMM with fp32 output into a new tensor where torch has it (the partial product never rounded); else, for CPU
    tensors or mixed operands, acc += the product of upcast operands; else (CUDA without that GEMM) the product in
    the operands' dtype, added."""
    if a.dtype == b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if has_fp32_out_gemm(acc.device.type, a.dtype):
        return torch.addmm(acc, a, b, out_dtype=acc.dtype)
    if acc.device.type == "cpu" or a.dtype != b.dtype:
        return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    return acc.add_(a @ b)
