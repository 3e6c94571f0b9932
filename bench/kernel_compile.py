"""Compile report of the Triton kernels for real GPU targets, on any machine (no GPU needed).

    python -m bench.kernel_compile                 # table: every kernel x arch x dtype at the dispatcher's configs
    python -m bench.kernel_compile --json          # the rows as one JSON list
    python -m bench.kernel_compile --dump DIR      # also DIR/<kernel>-<arch>-<dtype>-<config>[-<variant>].ptx
    python -m bench.kernel_compile --configs m64-v128-d64-w8-s3 m64-v64-d64-w8-s3   # try other tilings

Each kernel is compiled ahead of time by Triton for sm_80 (A100) and sm_90a (H100 / H200), for bf16 and fp32
inputs (the dtypes the Triton backends take), with the launch configuration the dispatcher picks there (`triton_sftmix.TILE_CONFIGS`) and the hints the
real launch gets: 16-byte-aligned pointers and the integers divisible by 16 at the Llama-3-8B head, marked
`tt.divisibility 16`; the arguments in each kernel's `do_not_specialize` get none. The soft-cap and bias variants
are compiled too (``variant`` column: the heaviest code), and rowchunk for a vocabulary that is not a multiple of 16
(``v32001``: V without its divisibility hint, the padded row strides with theirs). The figures are the compiler's own: registers and spill
bytes from ptxas (`ptxas -v`, the ptxas bundled with Triton that reads the PTX it writes), shared memory from the
compile metadata, and from the SASS (`cuobjdump -sass`): the tensor-core instruction kind (HGMMA = wgmma,
HMMA = mma.sync), global atomics (ATOM / RED) and GPU- or system-scope fences (MEMBAR .GPU / .SYS, what an
acq_rel atomic compiles to; the CTA-scope MEMBAR that precedes wgmma's shared-memory proxy fence is not one).

For rowchunk, whose pass 2 stores G over the logits the program reads, the TTGIR's layouts of its 2-D loads and
stores (``warp_rows``, see `warp_rows`): every row must be held by one warp in all of them, or a barrier must
separate each store from the loads before it; and ``vector_io``, its vector global loads and stores in the PTX.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from sftmix_trl.kernels import triton_rowchunk, triton_sftmix
from sftmix_trl.kernels.triton_rowchunk import ElementwiseConfig
from sftmix_trl.kernels.triton_sftmix import TileConfig

ARCHS = {"sm_80": 80, "sm_90a": 90}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# per-block shared memory limits (opt-in maximum): A100 163 KB, H100 / H200 227 KB
SHARED_LIMITS = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
KERNELS = {
    "forward": triton_sftmix._sftmix_forward_kernel,
    "logit_grad": triton_sftmix._logit_grad_kernel,
    "rowchunk": triton_rowchunk._rowchunk_kernel,
}
KERNEL_NAMES = tuple(KERNELS)
# the kernels whose products run in Triton (`tl.dot`); rowchunk's element-wise pass has none (cuBLAS does them)
MMA_KERNELS = {"forward", "logit_grad"}
# pointer element types; "{dtype}" is the input dtype
POINTER_TYPES = {
    "hidden_ptr": "{dtype}",
    "weight_ptr": "{dtype}",
    "bias_ptr": "{dtype}",
    "grad_logits_ptr": "{dtype}",
    "grad_ptr": "{dtype}",
    "argmax_ptr": "i32",
    "ntp_targets_ptr": "i64",
    "mix_targets_ptr": "i64",
    "part_arg_ptr": "i32",
}
FLOAT_SCALARS = {"softcap"}
# the integers of a Llama-3-8B head launch (D = 4096, V = 128256; G chunk 8192 columns): all divisible by 16
HINTED_INTEGERS = {"hidden_size", "vocab_size", "stride_h", "stride_w", "stride_g", "stride_z"}
VARIANTS = {
    "plain": dict(HAS_BIAS=False, SOFTCAP=False),
    "bias+softcap": dict(HAS_BIAS=True, SOFTCAP=True),
    # V = 32,001 (a vocabulary after `resize_token_embeddings`): vocab_size gets no divisibility hint
    "v32001": dict(HAS_BIAS=False, SOFTCAP=False),
}
UNHINTED = {"v32001": {"vocab_size"}}
KERNEL_VARIANTS = {"forward": ("plain", "bias+softcap"), "logit_grad": ("plain", "bias+softcap")}
KERNEL_VARIANTS["rowchunk"] = ("plain", "bias+softcap", "v32001")
FIELDS = ("kernel", "arch", "dtype", "config", "variant", "registers", "spill_bytes", "shared_bytes", "mma")
FIELDS += ("atomics", "fences", "mma_expected", "warp_rows", "vector_io")
# the kernels that store over what they load (rowchunk's G over Z)
IN_PLACE_KERNELS = {"rowchunk"}
ONE_WARP_PER_ROW, BARRIER = "one warp per row", "barrier"


def _triton_bin(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas() -> str:
    """The newest ptxas bundled with Triton (the plain one may be older than the PTX version Triton writes)."""
    blackwell = _triton_bin("ptxas-blackwell")
    return blackwell if os.path.exists(blackwell) else _triton_bin("ptxas")


def signature(kernel, dtype_name: str, config, variant: dict, unhinted=frozenset()):
    """(signature, constexprs, attrs) of an ASTSource for ``kernel``; the integers in ``unhinted`` get no
    divisibility hint."""
    dtype = dtype_name
    specialized = set(kernel.do_not_specialize)
    sig, constexprs, attrs = {}, {}, {}
    values = dict(
        UPCAST=False,
        DOT_PRECISION=triton_sftmix.dot_precision(DTYPES[dtype_name]),
        BLOCK_M=config.block_m,
        BLOCK_V=config.block_v,
        BLOCK_D=getattr(config, "block_d", None),
        GRAD_GROUP=triton_sftmix.GRAD_TILE_GROUP,
        # rowchunk: the gradient pass included (the heavier code); DFT only rescales two vectors
        WRITE_GRAD=True,
        DFT=False,
        **variant,
    )
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = values[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + POINTER_TYPES.get(name, "fp32").format(dtype=dtype)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in HINTED_INTEGERS and name not in unhinted and index not in specialized:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def _sass_counts(sass: str) -> dict:
    instructions = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+([A-Z][A-Z0-9_.]*)", sass, flags=re.MULTILINE)
    ops = [op.split(".")[0] for op in instructions]
    mma = "wgmma" if "HGMMA" in ops else "mma" if "HMMA" in ops else "none"
    atomics = sum(op in ("ATOM", "ATOMG", "RED", "REDG") for op in ops)
    # GPU- and system-scope fences (what an acq_rel atomic brings); the CTA-scope MEMBAR before wgmma's async-proxy
    # fence orders shared memory inside the block and is not counted
    fences = sum(op.startswith("MEMBAR") and not op.endswith(".CTA") for op in instructions)
    return dict(mma=mma, atomics=atomics, fences=fences)


_BLOCKED = re.compile(r"^(#[\w.]+) = #ttg\.blocked<\{(.*?)\}>", re.MULTILINE)
_MEMORY_2D = re.compile(r"\btt\.(load|store)\b[^\n]*?:\s*tensor<\d+x\d+x!tt\.ptr<\w+>,\s*(#[\w.]+)>")


def _blocked_fields(text: str) -> dict:
    return {
        key: tuple(int(v) for v in values.split(",")) for key, values in re.findall(r"(\w+) = \[([\d, ]+)\]", text)
    }


def warp_rows(ttgir: str) -> str:
    """How the 2-D loads and stores of a kernel that stores over what it loads are ordered between warps:
    ONE_WARP_PER_ROW when every one of them uses a blocked layout with one warp across the columns
    (warpsPerCTA[1] = 1) and the same row-to-warp map (rows per thread, threads and warps along the rows), so that
    the warp that stores a row is the one that loaded it; BARRIER when a barrier lies between each 2-D store
    and the 2-D load before it; otherwise "RACE: ..." with what lets a warp store over another's loads."""
    layouts = {alias: _blocked_fields(fields) for alias, fields in _BLOCKED.findall(ttgir)}
    ops = [(match.start(), match.group(1), match.group(2)) for match in _MEMORY_2D.finditer(ttgir)]
    if not ops:
        return "RACE: no 2-D loads or stores found in the TTGIR"
    problems, row_maps = [], set()
    for _, op, alias in ops:
        layout = layouts.get(alias)
        if layout is None:
            problems.append(f"{op} in a non-blocked layout {alias}")
            continue
        if layout["warpsPerCTA"][1] != 1:
            problems.append(f"{op} with warpsPerCTA {list(layout['warpsPerCTA'])} (a row over several warps)")
        row_maps.add((layout["sizePerThread"][0], layout["threadsPerWarp"][0], layout["warpsPerCTA"][0]))
    if len(row_maps) > 1:
        problems.append(f"loads and stores map rows to warps differently: {sorted(row_maps)}")
    if not problems:
        return ONE_WARP_PER_ROW
    # tl.debug_barrier: `ttg.barrier all` (triton 3.9), `gpu.barrier` (earlier)
    barriers = [match.start() for match in re.finditer(r"\b(?:gpu|ttg)\.barrier\b", ttgir)]
    last_load, ordered = None, True
    for position, op, _ in ops:
        if op == "load":
            last_load = position
        elif last_load is not None and not any(last_load < barrier < position for barrier in barriers):
            ordered = False
    return BARRIER if ordered else "RACE: " + "; ".join(dict.fromkeys(problems))


def _vector_io(ptx: str) -> int:
    """Vector global loads and stores (ld.global.v2 / .v4, st.global...) in the PTX."""
    return len(re.findall(r"\b(?:ld|st)\.global(?:\.\w+)*?\.v[248]\b", ptx))


def compile_row(kernel_name: str, arch: str, dtype_name: str, config, variant_name: str, dump=None):
    """One report row: compile, then read ptxas -v, the SASS and (rowchunk) the TTGIR layouts."""
    kernel = KERNELS[kernel_name]
    unhinted = UNHINTED.get(variant_name, set())
    sig, constexprs, attrs = signature(kernel, dtype_name, config, VARIANTS[variant_name], unhinted)
    source = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", ARCHS[arch], 32)
    compiled = triton.compile(source, target=target, options=dict(num_warps=config.num_warps,
                                                                    num_stages=config.num_stages))  # fmt: skip
    row = dict(kernel=kernel_name, arch=arch, dtype=dtype_name, config=str(config), variant=variant_name)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx_path.write_text(compiled.asm["ptx"])
        cubin_path.write_bytes(compiled.asm["cubin"])
        ptxas = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={arch}", str(ptx_path), "-o", str(Path(tmp, "v.cubin"))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        sass = subprocess.run(
            [_triton_bin("cuobjdump"), "-sass", str(cubin_path)], capture_output=True, text=True, check=True
        ).stdout
    info = ptxas.stderr
    row["registers"] = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    row["spill_bytes"] = int(spills.group(1)) + int(spills.group(2))
    row["shared_bytes"] = int(compiled.metadata.shared)
    row.update(_sass_counts(sass))
    row["mma_expected"] = kernel_name in MMA_KERNELS
    row["warp_rows"] = warp_rows(compiled.asm["ttgir"]) if kernel_name in IN_PLACE_KERNELS else "-"
    row["vector_io"] = _vector_io(compiled.asm["ptx"])
    if dump is not None:
        Path(dump, ptx_name(row)).write_text(compiled.asm["ptx"])
    return {field: row[field] for field in FIELDS}


def ptx_name(row: dict) -> str:
    """<kernel>-<arch>-<dtype>-<config>.ptx, with -<variant> before .ptx for the variants other than plain."""
    suffix = "" if row["variant"] == "plain" else f"-{row['variant']}"
    return f"{row['kernel']}-{row['arch']}-{row['dtype']}-{row['config']}{suffix}.ptx"


def dispatcher_configs():
    """(kernel, arch, dtype, config) of every launch the dispatcher can choose on a GPU."""
    for kernel_name in KERNEL_NAMES:
        for arch in ARCHS:
            for dtype_name, dtype in DTYPES.items():
                if kernel_name == "rowchunk":
                    config = triton_rowchunk.gpu_config(dtype)
                else:
                    config = triton_sftmix.tile_config(kernel_name, "sm_90" if arch == "sm_90a" else "sm_80", dtype)
                yield kernel_name, arch, dtype_name, config


def parse_config(text: str, kernel_name: str = "forward"):
    """'m64-v128-d64-w8-s3' -> TileConfig; for rowchunk 'm8-v512-w8-s3' -> ElementwiseConfig."""
    values = dict(re.findall(r"([mvdws])(\d+)", text))
    keys = dict(m="block_m", v="block_v", d="block_d", w="num_warps", s="num_stages")
    config = {keys[k]: int(v) for k, v in values.items()}
    return ElementwiseConfig(**config) if kernel_name == "rowchunk" else TileConfig(**config)


def problems(row: dict) -> list[str]:
    """What a row fails of the GPU-grade bar: no spills, shared memory that fits, tensor cores, no fences; for the
    kernels that store over what they load, no warp storing over another's loads, and vector loads and stores."""
    found = []
    if row["warp_rows"].startswith("RACE"):
        found.append(row["warp_rows"])
    if row["kernel"] in IN_PLACE_KERNELS and not row["vector_io"]:
        found.append("no vector global loads or stores")
    if row["spill_bytes"]:
        found.append(f"{row['spill_bytes']} spill bytes")
    if row["shared_bytes"] > SHARED_LIMITS[row["arch"]]:
        found.append(f"shared {row['shared_bytes']} > {SHARED_LIMITS[row['arch']]}")
    if row["mma_expected"] and row["mma"] == "none":
        found.append("no tensor-core MMA")
    if row["fences"]:
        found.append(f"{row['fences']} fences")
    return found


def report(jobs, dump=None, workers=None):
    """Compile ``jobs`` ((kernel, arch, dtype, config, variant) tuples) in parallel processes; rows in job order."""
    with ProcessPoolExecutor(max_workers=workers or min(len(jobs), os.cpu_count() or 1)) as pool:
        futures = [pool.submit(compile_row, *job, dump) for job in jobs]
        return [future.result() for future in futures]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    parser.add_argument("--dump", type=Path, default=None, help="write each compiled PTX under this folder")
    parser.add_argument("--configs", nargs="+", default=None, help="tilings to try instead of the dispatcher's")
    parser.add_argument("--kernels", nargs="+", choices=KERNEL_NAMES, default=list(KERNEL_NAMES))
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
    if args.configs:
        launches = [
            (k, a, d, parse_config(c, k))
            for k in args.kernels
            for a in args.archs
            for d in args.dtypes
            for c in args.configs
        ]
    else:
        launches = [job for job in dispatcher_configs() if job[0] in args.kernels and job[1] in args.archs]
        launches = [job for job in launches if job[2] in args.dtypes]
    jobs = [
        (*launch, variant) for launch in launches for variant in args.variants if variant in KERNEL_VARIANTS[launch[0]]
    ]
    rows = report(jobs, args.dump)
    if args.json:
        print(json.dumps(rows))
    else:
        widths = {f: max(len(f), *(len(str(r[f])) for r in rows)) for f in FIELDS}
        print("  ".join(f.ljust(widths[f]) for f in FIELDS) + "  verdict")
        for row in rows:
            verdict = "; ".join(problems(row)) or "ok"
            print("  ".join(str(row[f]).ljust(widths[f]) for f in FIELDS) + "  " + verdict)
        print(f"triton {triton.__version__}, ptxas {Path(_ptxas()).name}")
    return 1 if any(problems(row) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
