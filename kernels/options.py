"""Options of the fused SFTMix loss, shared by the functional API, the autograd Function and the module."""

import math
from dataclasses import dataclass

IMPLS = ("auto", "rowchunk", "triton", "torch", "reference")


@dataclass(frozen=True)
class SFTMixLossOptions:
    r"""Options of the SFTMix loss ``L = L_NTP + mixup_coef * L_Mixup``.

    Kernel options (as Liger-Kernel's and cut-cross-entropy's keyword arguments), not a command-line config that a
    parser reads: this docstring is their documentation.

    Args:
        mixup_coef (`float`, *optional*, defaults to `0.2`):
            Weight ``mu`` of the mixup term in the loss.
        ignore_index (`int`, *optional*, defaults to `-100`):
            Target value of rows without next-token loss (prompt, padding).
        logit_softcap (`float` or `None`, *optional*, defaults to `None`):
            Gemma-2 style soft cap ``c * tanh(z / c)`` applied to every row's logits and to the mixed logits
            ``z~`` after mixing. `None` disables it.
        dft (`bool`, *optional*, defaults to `False`):
            Dynamic Fine-Tuning ([arXiv 2508.05629](https://huggingface.co/papers/2508.05629)), TRL's
            `loss_type="dft"`, on the next-token term: each row's ``lse(z_n) - z_n[t_n]`` is weighted by its own
            probability ``p_n = exp(-(lse(z_n) - z_n[t_n]))``, held constant (no gradient through the weight). The
            mixup term is unchanged.
        impl (`str`, *optional*, defaults to `"auto"`):
            `"rowchunk"` (row chunks: cuBLAS products and one Triton element-wise pass per chunk, 6 N D V FLOPs),
            `"triton"` (fused Triton kernels, 8 N D V FLOPs, no logits in memory), `"torch"` (chunked PyTorch),
            `"reference"` (dense eager PyTorch), or `"auto"`: for CUDA tensors with Triton installed, rowchunk for
            bf16 / fp16 inputs and triton for fp32 ones (tf32x3 tensor cores instead of cuBLAS's fp32); torch
            otherwise. bench/kernel_model.py puts rowchunk fastest for bf16 at every benchmark head.
        validate (`bool`, *optional*, defaults to `True`):
            Check the data of the inputs (targets inside the vocabulary, mixed rows in range, valid and in at most
            one mixed position, finite lambdas in [0, 1], finite weights, positive normalizer). These checks cost
            one host sync per call; shape / dtype / device checks are free and always run. Switch off only where
            the caller guarantees these properties: a violation then gives wrong numbers or a device fault.
        chunk_rows (`int` or `None`, *optional*, defaults to `None`):
            Rows per forward chunk of the torch implementation (a mixed pair counts two rows); its reused buffers
            hold 2.5 x chunk_rows x V floats (logits, their exps, the mixed logits). `None`: the largest power of two
            whose logits fit in `chunk_bytes`.
        chunk_bytes (`int` or `None`, *optional*, defaults to `None`):
            Torch: memory budget of one chunk of logits (fp32; fp64 for fp64 inputs), in bytes: it sets the rows
            of a forward chunk (unless `chunk_rows` is given) and, on CUDA, the vocabulary columns of a backward
            chunk over all rows. `None`: 2**26 on CPU (2**24 logits, 256 rows of a 49k vocabulary; on CPU 128 rows
            are markedly slower and 512 barely faster), 2**29 elsewhere (1,024 rows of a 128k vocabulary, 16,384
            columns at 8,192 rows; peak extra memory about 2.5x the budget). See `kernels/chunked.py`.
        block_pairs (`int` or `None`, *optional*, defaults to `None`):
            Triton: row slots per program on each side of a pair tile (power of two, >= 16). `None` picks one.
        block_v (`int` or `None`, *optional*, defaults to `None`):
            Triton: vocabulary columns per block (power of two, >= 16). `None` picks one.
        block_d (`int` or `None`, *optional*, defaults to `None`):
            Triton: hidden-dimension slice per `tl.dot` (power of two, >= 16). `None` picks one.
        v_splits (`int` or `None`, *optional*, defaults to `None`):
            Triton: vocabulary ranges the forward grid splits each row tile into (their log-sum-exps are combined
            afterwards). `None` picks enough for about two waves of programs on the GPU, and 1 in the interpreter.
        vocab_chunk (`int` or `None`, *optional*, defaults to `None`):
            Triton: vocabulary columns per chunk of the backward (rounded down to a multiple of the vocabulary block);
            its logit-gradient buffer holds N x vocab_chunk values in the input dtype. `None` picks the most that fit
            in 2**26 values (8,192 columns at N = 8,192: 128 MiB in bf16).
        memory_budget (`int` or `None`, *optional*, defaults to `None`):
            Rowchunk: bytes it may allocate beyond the inputs and the returned gradients: the fp32 dH (4 N D), one
            chunk's fp32 logits and hidden rows (about 4 V bytes a row) and, when it leaves room for a chunk of at
            least min(N, 1,024) rows, an fp32 V x D accumulator of dW (bf16 / fp16 inputs; else dW accumulates in
            the input dtype, rounded once per chunk). `None`: the batch's logits in the input dtype, N x V x
            itemsize (a tenth of the eager reference's 20 N V bytes at bf16).
    """

    mixup_coef: float = 0.2
    ignore_index: int = -100
    logit_softcap: float | None = None
    dft: bool = False
    impl: str = "auto"
    validate: bool = True
    chunk_rows: int | None = None
    chunk_bytes: int | None = None
    block_pairs: int | None = None
    block_v: int | None = None
    block_d: int | None = None
    v_splits: int | None = None
    vocab_chunk: int | None = None
    memory_budget: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.mixup_coef) or self.mixup_coef < 0:
            raise ValueError(f"mixup_coef must be a finite number >= 0, got {self.mixup_coef}.")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}.")
        if self.logit_softcap is not None and not (math.isfinite(self.logit_softcap) and self.logit_softcap > 0):
            raise ValueError(f"logit_softcap must be None or a finite number > 0, got {self.logit_softcap}.")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}.")
        if self.chunk_rows is not None and self.chunk_rows < 2:
            raise ValueError(f"chunk_rows must be None or >= 2, got {self.chunk_rows}.")
        if self.chunk_bytes is not None and self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be None or >= 1, got {self.chunk_bytes}.")
        if self.vocab_chunk is not None and self.vocab_chunk < 1:
            raise ValueError(f"vocab_chunk must be None or >= 1, got {self.vocab_chunk}.")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ValueError(f"memory_budget must be None or >= 1, got {self.memory_budget}.")
        if self.v_splits is not None and self.v_splits < 1:
            raise ValueError(f"v_splits must be None or >= 1, got {self.v_splits}.")
        for name in ("block_pairs", "block_v", "block_d"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"{name} must be None or a power of two >= 16, got {value}.")
