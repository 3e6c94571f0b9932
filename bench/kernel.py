"""Microbenchmark of the fused SFTMix loss: time and peak memory of each implementation.

    python -m bench.kernel                       # CUDA: all heads, N = 1k..16k, bf16
    python -m bench.kernel --quick               # CPU: SmolLM2's head, N = 1024 timings + N = 4096 peak memory, fp32
    python -m bench.kernel --shapes llama-3-8b --tokens 8192 --impls reference triton triton_nomix

Heads (bench/kernel_model.py's HEADS, which the cost model prices too): SmolLM2-135M, Llama-3-8B, Qwen2.5-7B and
Gemma-2-2B, the last with its logit soft cap 30.0, which every implementation applies.

Rows: `reference` (dense eager PyTorch, the tests' oracle twin, materializes h_mix and a third logits tensor),
`compile` (torch.compile of that reference), `torch` (chunked), `triton`, `triton_nomix` (same kernel, P = 0: what
mixing costs), `rowchunk` and `rowchunk_nomix` (row chunks on cuBLAS, `auto`'s choice on CUDA for bf16), `liger` (Liger-Kernel's fused linear cross-entropy for NTP plus the naive dense mixup term; only
where liger_kernel is installed). Half the rows sit in mixed pairs by default (P = N / 4 pairs, `--mix-fraction`).

Modes: `fwd` (forward with grad-requiring inputs), `bwd` (backward alone, after an untimed forward), `full`
(forward + backward). The fused implementations (`torch`, `triton`) compute their gradients in forward when an input
requires grad and only scale them in backward, so their `fwd` holds nearly all of `full`: compare `full` rows.
Peak memory is that of one full step above the inputs: `torch.cuda.max_memory_allocated` on CUDA; on CPU the peak
resident set size of a fresh subprocess per implementation (torch's CPU allocations are invisible to tracemalloc), an
upper bound since the allocator may keep freed pages. Two rows: `peak_memory`, everything the step allocated, and
`peak_memory_extra`, the same less the `.grad` tensors it leaves behind (N D + V D in the input dtype): the
the accounting of docs/performance.md and of the cost model, "beyond the inputs and the returned gradients".

A table goes to stdout and CSV rows (kernel, impl, mode, metric, unit, N, D, V, dtype, median, p20, p80, device,
date, version, note) to `--csv` (default bench/results/kernel-<device>-<date>.csv). `--check` also records, for the
peak-memory steps, each implementation's largest relative difference to the reference (loss, grads of hidden and
weight). An implementation that raises gets an `error` row (its exception in `note`) and the others go on.

    python -m bench.kernel --preflight           # what works here: a Triton launch, torch's fp32-output GEMM
    python -m bench.kernel --phases --shapes llama-3-8b --tokens 8192   # per-phase times beside the cost model

`--phases`: each phase of one rowchunk chunk at the plan's chunk shape (cuBLAS Z = H W^T with fp32 output, the
Triton element-wise pass at `block_v` 256 and 512, dH = G W, dW += G^T H), and the triton backend's forward kernel
at N rows, timed with CUDA events (perf_counter on CPU), beside the cost model's figure for the same phase and the
efficiency it implies (of peak FLOP/s for products, of HBM bandwidth for the element-wise pass) against the one the
model assumes. block_v = 512 lays a row over two warps, which races (`triton_rowchunk.gpu_config`): timed only,
its G is not used.
"""

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from . import ROOT, module_command
from .inputs import make_inputs
from .kernel_model import HEADS  # (hidden size, vocabulary, logit soft cap)

IMPLS = ("reference", "compile", "torch", "triton", "triton_nomix", "rowchunk", "rowchunk_nomix", "liger")
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = ("kernel", "impl", "mode", "metric", "unit", "N", "D", "V", "dtype", "median", "p20", "p80", "device", "date")
FIELDS += ("version", "note")
RESULTS = Path(__file__).resolve().parent / "results"
MIXUP_COEF = 0.2


def loss_function(impl, inputs):
    """A zero-argument callable returning the differentiable loss of ``impl`` on ``inputs`` (None: unavailable)."""
    from sftmix_trl.kernels import sftmix_linear_cross_entropy
    from sftmix_trl.kernels.reference import sftmix_loss_reference

    args = [inputs[k] for k in ("hidden", "weight", "targets", "mix_index", "mix_lambda", "mix_weight")]
    normalizer, softcap = inputs["ntp_normalizer"], inputs["logit_softcap"]
    if impl in ("reference", "torch", "triton", "triton_nomix", "rowchunk", "rowchunk_nomix"):
        if impl.endswith("_nomix"):
            args[3:] = [args[3][:0], args[4][:0], args[5][:0]]
        name = impl.removesuffix("_nomix")
        if name in ("triton", "rowchunk") and args[0].device.type != "cuda":
            return None

        def run():
            return sftmix_linear_cross_entropy(
                *args, ntp_normalizer=normalizer, mixup_coef=MIXUP_COEF, impl=name, validate=False,
                logit_softcap=softcap,
            ).loss  # fmt: skip

        return run
    if impl == "compile":

        def reference_outputs(hidden, weight, targets, mix_index, mix_lambda, mix_weight, normalizer):
            out = sftmix_loss_reference(
                hidden, weight, targets, mix_index, mix_lambda, mix_weight,
                bias=None, ntp_mask=None, ntp_normalizer=normalizer, mixup_coef=MIXUP_COEF, ignore_index=-100,
                logit_softcap=softcap,
            )  # fmt: skip
            return out.loss, out.num_correct, out.entropy

        compiled = torch.compile(reference_outputs)
        return lambda: compiled(*args, normalizer.float())[0]
    if impl == "liger":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        if args[0].device.type != "cuda":
            return None
        ntp_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum", softcap=softcap)
        hidden, weight, targets, mix_index, mix_lambda, mix_weight = args

        def run():
            ntp = ntp_loss(weight, hidden, targets)
            ntp = (ntp[0] if isinstance(ntp, tuple) else ntp) / normalizer
            # the naive mixup term: h_mix, a third head product, a dense P x V logits tensor
            lam = mix_lambda[:, None].to(hidden.dtype)
            mixed = (lam * hidden[mix_index[:, 0]] + (1 - lam) * hidden[mix_index[:, 1]]) @ weight.T
            mixed = mixed.float() if softcap is None else softcap * torch.tanh(mixed.float() / softcap)
            log_probs = torch.log_softmax(mixed, dim=-1)
            soft_nll = -(
                mix_lambda * log_probs.gather(1, targets[mix_index[:, 0], None]).squeeze(1)
                + (1 - mix_lambda) * log_probs.gather(1, targets[mix_index[:, 1], None]).squeeze(1)
            )
            return ntp + MIXUP_COEF * (mix_weight * soft_nll).sum()

        return run
    raise ValueError(f"unknown impl {impl!r}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(inputs):
    inputs["hidden"].grad = None
    inputs["weight"].grad = None


def time_mode(run, inputs, mode, repeats, warmup):
    """Milliseconds of each timed repeat of ``mode``."""
    device = inputs["hidden"].device
    times = []
    for step in range(warmup + repeats):
        _clear_grads(inputs)
        loss = None
        if mode == "bwd":
            loss = run()
            _sync(device)
        start = time.perf_counter()
        if mode == "fwd":
            loss = run()
        elif mode == "bwd":
            loss.backward()
        else:
            run().backward()
        _sync(device)
        if step >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
        del loss
    _clear_grads(inputs)
    return times


def rss_bytes(field="VmRSS"):
    """Current (VmRSS) or peak (VmHWM) resident set size of this process."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that earlier peaks (imports, compilation) do not count."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_memory(impl, num_rows, hidden_size, vocab_size, dtype, device, mix_fraction, softcap=None):
    """(peak MiB of one full step above the inputs, (loss, grad hidden, grad weight) of that step), or None.

    On CPU both come from a fresh subprocess.
    """
    if device.type == "cuda":
        inputs = make_inputs(num_rows, hidden_size, vocab_size, dtype, device, mix_fraction, logit_softcap=softcap)
        run = loss_function(impl, inputs)
        if run is None:
            return None
        result = loss_and_grads(run, inputs)  # also the warm-up (compilation, autotuning)
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run().backward()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, result
    if loss_function(impl, make_inputs(2, 16, 16, dtype, device, 0.0)) is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.pt"
        command = [*module_command(__spec__.name), "--memory-probe", impl, str(num_rows), str(hidden_size)]
        command += [str(vocab_size), _dtype_name(dtype), str(mix_fraction), str(softcap), str(result_path)]
        probe = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        return json.loads(probe.stdout.strip().splitlines()[-1])["peak_mib"], torch.load(result_path)


def _memory_probe(impl, num_rows, hidden_size, vocab_size, dtype_name, mix_fraction, softcap, result_path):
    """Subprocess body: peak RSS of one full step above the inputs (a compiled impl runs once before)."""
    dtype, cpu = DTYPES[dtype_name], torch.device("cpu")
    inputs = make_inputs(num_rows, hidden_size, vocab_size, dtype, cpu, mix_fraction, logit_softcap=softcap)
    run = loss_function(impl, inputs)
    if impl == "compile":
        loss_and_grads(run, inputs)
    gc.collect()
    reset_peak_rss()
    base = rss_bytes()
    loss = run()
    loss.backward()
    peak = rss_bytes("VmHWM")
    torch.save((loss.detach(), inputs["hidden"].grad, inputs["weight"].grad), result_path)
    print(json.dumps({"peak_mib": max(peak - base, 0) / 2**20}))


def loss_and_grads(run, inputs):
    """(loss, grad of hidden, grad of weight) of one full step."""
    _clear_grads(inputs)
    loss = run()
    loss.backward()
    result = (loss.detach(), inputs["hidden"].grad, inputs["weight"].grad)
    _clear_grads(inputs)
    return result


def relative_errors(result, reference_result):
    """Largest |x - ref| / max|ref| of each of (loss, grad hidden, grad weight)."""
    return [
        float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))
        for a, b in zip(result, reference_result)
    ]


def _dtype_name(dtype):
    return next(name for name, value in DTYPES.items() if value == dtype)


def device_label(device, machine=None):
    if machine:
        return machine
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def version_label():
    import sftmix_trl

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"sftmix-trl {sftmix_trl.__version__} {commit}; torch {torch.__version__}; triton {triton_version}"


def percentiles(values):
    """(median, 20th, 80th percentile) of the timed repeats."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    quantiles = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), quantiles[1], quantiles[7]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(HEADS), default=list(HEADS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096, 8192, 16384])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--mix-fraction", type=float, default=0.5, help="fraction of the rows in mixed pairs")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on CUDA, 3 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on CPU")
    parser.add_argument(
        "--memory-tokens", nargs="+", type=int, default=None, help="N for peak memory (default: --tokens)"
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--check", action="store_true", help="also record relative errors against the reference")
    parser.add_argument(
        "--quick", action="store_true", help="CPU-sized run (SmolLM2 head, N=1024 timed, N=4096 memory)"
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--machine", default=None, help="device name written to the CSV (default: detected)")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--preflight", action="store_true", help="print what works on this machine, then exit")
    parser.add_argument("--phases", action="store_true", help="per-phase timings beside the cost model, then exit")
    parser.add_argument("--memory-probe", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.preflight:
        return preflight(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if args.memory_probe:
        impl, num_rows, hidden_size, vocab_size, dtype_name, mix_fraction, softcap, result_path = args.memory_probe
        softcap = None if softcap == "None" else float(softcap)
        _memory_probe(
            impl, int(num_rows), int(hidden_size), int(vocab_size), dtype_name, float(mix_fraction), softcap,
            result_path,
        )  # fmt: skip
        return

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if args.quick:
        args.shapes, args.tokens, args.memory_tokens = ["smollm2-135m"], [1024], [4096]
        args.impls = [impl for impl in args.impls if on_gpu or impl in ("reference", "compile", "torch")]
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    repeats = args.repeats or (20 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    memory_tokens = args.memory_tokens or args.tokens
    date = datetime.date.today().isoformat()
    label, version = device_label(device, args.machine), version_label()
    csv_path = args.csv or RESULTS / f"kernel-{'cuda' if on_gpu else 'cpu'}-{date}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists()
    print(f"# {label}; {version}; dtype {_dtype_name(dtype)}; mix fraction {args.mix_fraction}; -> {csv_path}")
    print(f"{'head':>13} {'N':>6} {'impl':>13} {'mode':>5} {'metric':>11} {'median':>10} {'p20':>10} {'p80':>10}")

    with open(csv_path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()

        def emit(shape, num_rows, impl, mode, metric, unit, values, note=""):
            median, p20, p80 = percentiles(values)
            hidden_size, vocab_size, _ = HEADS[shape]
            row = dict(kernel="sftmix_linear_cross_entropy", impl=impl, mode=mode, metric=metric, unit=unit)
            row.update(N=num_rows, D=hidden_size, V=vocab_size, dtype=_dtype_name(dtype), device=label, date=date)
            row.update(median=f"{median:.6g}", p20=f"{p20:.6g}", p80=f"{p80:.6g}", version=version, note=note)
            writer.writerow(row)
            handle.flush()
            print(f"{shape:>13} {num_rows:>6} {impl:>13} {mode:>5} {metric + ' ' + unit:>11} "
                  f"{median:>10.4g} {p20:>10.4g} {p80:>10.4g} {note}")  # fmt: skip

        def emit_error(shape, num_rows, impl, error, detail=None):
            message = f"{type(error).__name__}: {detail or error}".replace("\n", " ")[:300]
            emit(shape, num_rows, impl, "full", "error", "-", [float("nan")], note=message)

        if args.phases:
            for shape in args.shapes:
                for num_rows in args.tokens:
                    for phase in phase_rows(shape, num_rows, dtype, device, repeats, warmup, label):
                        try:
                            if isinstance(phase, Exception):
                                raise phase
                            name, metric, unit, values, note = phase
                            emit(shape, num_rows, name, "phase", metric, unit, values, note)
                        except Exception as error:
                            emit_error(shape, num_rows, "phases", error)
            return

        for shape in args.shapes:
            hidden_size, vocab_size, softcap = HEADS[shape]
            for num_rows in args.tokens:
                inputs = make_inputs(
                    num_rows, hidden_size, vocab_size, dtype, device, args.mix_fraction, logit_softcap=softcap
                )
                for impl in args.impls:
                    run = None
                    try:
                        run = loss_function(impl, inputs)
                        if run is None:
                            print(f"{shape:>13} {num_rows:>6} {impl:>13} skipped (not available on {device.type})")
                            continue
                        for mode in args.modes:
                            emit(
                                shape,
                                num_rows,
                                impl,
                                mode,
                                "time",
                                "ms",
                                time_mode(run, inputs, mode, repeats, warmup),
                            )
                    except Exception as error:  # one failing implementation must not cost the others their rows
                        emit_error(shape, num_rows, impl, error)
                    del run
                    _release(device)
                del inputs
                _release(device)
            for num_rows in [] if args.no_memory else memory_tokens:
                reference_result = None
                for impl in sorted(args.impls, key=lambda impl: impl != "reference"):
                    try:
                        measured = peak_memory(
                            impl, num_rows, hidden_size, vocab_size, dtype, device, args.mix_fraction, softcap
                        )
                    except Exception as error:
                        detail = getattr(error, "stderr", None)
                        emit_error(shape, num_rows, impl, error, detail.strip().splitlines()[-1] if detail else None)
                        continue
                    finally:
                        _release(device)
                    if measured is None:
                        continue
                    peak, result = measured
                    emit(shape, num_rows, impl, "full", "peak_memory", "MiB", [peak])
                    # less the .grad tensors the step leaves behind (docs/performance.md's accounting)
                    grad_mib = (num_rows + vocab_size) * hidden_size * dtype.itemsize / 2**20
                    emit(shape, num_rows, impl, "full", "peak_memory_extra", "MiB", [peak - grad_mib])
                    if impl == "reference":
                        reference_result = result
                    elif args.check and reference_result is not None:
                        errors = relative_errors(result, reference_result)
                        for name, error in zip(("loss", "grad_hidden", "grad_weight"), errors):
                            emit(shape, num_rows, impl, "full", f"rel_err_{name}", "1", [error])
                    del result


def preflight(device) -> int:
    """Print what works here before any timing: a trivial Triton launch (its first launch on a machine compiles a C
    helper with the system's C compiler), torch's fp32-output GEMM as rowchunk calls it, the backend `auto` picks.
    Returns 1 when the Triton launch fails (nothing Triton will run), else 0."""
    import triton
    import triton.language as tl

    from sftmix_trl.kernels.functional import resolve_impl
    from sftmix_trl.kernels.gemm import has_fp32_out_gemm

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) + 1, mask=offsets < n)

    status = 0
    started = time.perf_counter()
    try:
        x = torch.zeros(1000, device=device)
        add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
        ok = bool((x == 1).all())
        print(f"preflight: triton {triton.__version__} launch on {device}: {'ok' if ok else 'WRONG RESULT'} "
              f"({time.perf_counter() - started:.1f} s with compilation)")  # fmt: skip
        status = 0 if ok else 1
    except Exception as error:
        print(f"preflight: triton launch on {device} FAILED: {type(error).__name__}: {error}")
        status = 1
    for dtype in (torch.bfloat16, torch.float16):
        try:
            works = has_fp32_out_gemm(device.type, dtype)
        except Exception as error:
            works = f"probe raised {type(error).__name__}: {error}"
        print(f"preflight: torch {torch.__version__} mm / addmm(out=, out_dtype=float32) with {dtype}: {works}")
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        print(f"preflight: impl='auto' on {device.type} for {dtype} -> {resolve_impl('auto', device, dtype)}")
    return status


def _timer(device):
    """() -> (start, stop_ms): CUDA events on CUDA, perf_counter elsewhere."""
    if device.type == "cuda":

        def start():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            return begin, end

        def stop(events):
            events[1].record()
            events[1].synchronize()
            return events[0].elapsed_time(events[1])

        return start, stop
    return time.perf_counter, lambda begin: 1e3 * (time.perf_counter() - begin)


def _time_ms(fn, device, repeats, warmup):
    start, stop = _timer(device)
    times = []
    for step in range(warmup + repeats):
        began = start()
        fn()
        elapsed = stop(began)
        if step >= warmup:
            times.append(elapsed)
    return times


def _model_device(label):
    """The cost model's device for a device name: H100 / H200, else H200 (the model's default)."""
    from .kernel_model import DEVICES

    return next((name for name in DEVICES if name in label), "H200")


def phase_rows(shape, num_rows, dtype, device, repeats, warmup, label):
    """Yield (impl, metric, unit, values, note) rows of `--phases` (an Exception for a phase that failed)."""
    from sftmix_trl.kernels import triton_rowchunk as rowchunk
    from sftmix_trl.kernels import triton_sftmix
    from sftmix_trl.kernels.gemm import product_into
    from sftmix_trl.kernels.layout import build_row_layout
    from sftmix_trl.kernels.options import SFTMixLossOptions
    from sftmix_trl.kernels.triton_common import INTERPRET, grad_dtype_for

    from . import kernel_model

    hidden_size, vocab_size, softcap = HEADS[shape]
    model_device = _model_device(label)
    model_spec = kernel_model.DEVICES[model_device]
    assumptions = kernel_model.Assumptions()
    rows, chunks, fp32_dw = kernel_model.rowchunk_plan(num_rows, hidden_size, vocab_size, dtype)
    rows = -(-num_rows // chunks)  # rows spread evenly over the chunks
    model = {phase.name: phase for phase in kernel_model.rowchunk_cost(shape, num_rows, model_device).phases}
    inputs = make_inputs(rows, hidden_size, vocab_size, dtype, device, 0.5, logit_softcap=softcap)
    hidden, weight = inputs["hidden"].detach(), inputs["weight"].detach()
    layout = build_row_layout(inputs["targets"], inputs["mix_index"], inputs["mix_lambda"], -100)
    chunk_hidden = hidden.index_select(0, layout.rows)
    stride = rowchunk.padded_row(vocab_size)
    logits = torch.zeros(rows, stride, dtype=torch.float32, device=device)[:, :vocab_size]
    grad = logits.view(grad_dtype_for(device, dtype))[:, :vocab_size]
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32 if fp32_dw else dtype, device=device)
    grad_hidden = torch.empty(rows, hidden_size, dtype=torch.float32, device=device)

    def model_ms(name):
        return 1e3 * model[name].time_s(assumptions) / chunks

    def gemm_row(impl, name, fn, flops):
        times = _time_ms(fn, device, repeats, warmup)
        achieved = flops / (statistics.median(times) * 1e-3) / model_spec.peak_flops
        note = f"{achieved:.0%} of {model_device} peak (model: {assumptions.gemm_efficiency:.0%})"
        return [(impl, "time", "ms", times, note), (impl, "model_time", "ms", [model_ms(name)], "")]

    note = f"chunk of {rows} rows ({chunks} chunks at N={num_rows}), fp32 dW accumulator {fp32_dw}"
    yield ("rowchunk chunk", "rows", "rows", [rows], note)
    flops = 2 * rows * hidden_size * vocab_size
    yield from gemm_row("Z = H W^T", "Z = H W^T (cuBLAS, fp32 out)",
                        lambda: product_into(logits, chunk_hidden, weight.T), flops)  # fmt: skip
    num_pairs = layout.num_pairs
    rest_half = (rows - 2 * num_pairs + 1) // 2
    ntp_row_scale = torch.where(layout.ntp_targets != -100, 1.0 / rows, 0.0).float()
    fp32 = dict(dtype=torch.float32, device=device)
    kernel_args = dict(
        logits_ptr=logits, grad_ptr=grad, bias_ptr=layout.ntp_targets, ntp_targets_ptr=layout.ntp_targets,
        ntp_row_scale_ptr=ntp_row_scale, lam_ptr=layout.mix_lambda.float().contiguous(),
        mix_targets_ptr=layout.mix_targets.contiguous(), mix_scale_ptr=torch.full((num_pairs,), 0.1, **fp32),
        lse_ptr=torch.empty(rows, **fp32), target_logit_ptr=torch.empty(rows, **fp32),
        entropy_ptr=torch.empty(rows, **fp32), argmax_ptr=torch.empty(rows, dtype=torch.int32, device=device),
        mix_lse_ptr=torch.empty(num_pairs, **fp32), mix_target_ptr=torch.empty(num_pairs, **fp32),
        num_slots=rows, num_pairs=num_pairs, num_pair_slots=num_pairs + rest_half, rest_half=rest_half,
        slot_start=0, pair_start=0, vocab_size=vocab_size, stride_z=stride, stride_g=grad.stride(0),
        ignore_index=-100, softcap=float(softcap or 1.0), HAS_BIAS=False, SOFTCAP=softcap is not None, DFT=False,
        WRITE_GRAD=True,
    )  # fmt: skip
    base = rowchunk.gpu_config(dtype)
    dram = rows * vocab_size * (8 + dtype.itemsize)  # Z read twice in fp32, G written once
    for block_v in (base.block_v, 2 * base.block_v):
        config = rowchunk.ElementwiseConfig(base.block_m, block_v, base.num_warps, base.num_stages)
        if INTERPRET:
            config = rowchunk.ElementwiseConfig(16, block_v, 4, 1)
        grid = (-(-(num_pairs + rest_half) // config.block_m),)

        def launch(config=config, grid=grid):
            rowchunk._rowchunk_kernel[grid](**kernel_args, BLOCK_M=config.block_m, BLOCK_V=config.block_v,
                                            num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip

        try:
            # the GEMM again before each launch would be timed too: the kernel reruns over its own G (same work)
            times = _time_ms(launch, device, repeats, warmup)
        except Exception as error:
            yield error
            continue
        bandwidth = dram / (statistics.median(times) * 1e-3) / model_spec.bandwidth
        race = "" if block_v == base.block_v else "; races (a row over two warps): timing only"
        yield (f"stats + G {config}", "time", "ms", times,
               f"{bandwidth:.0%} of {model_device} HBM (model: {assumptions.memory_efficiency:.0%}){race}")  # fmt: skip
    yield ("stats + G", "model_time", "ms", [model_ms("stats + G (Triton, element-wise)")], "")
    yield from gemm_row("dH = G W", "dH = G W (cuBLAS, fp32 out)",
                        lambda: product_into(grad_hidden, grad, weight), flops)  # fmt: skip
    yield from gemm_row("dW += G^T H", "dW += G^T H (cuBLAS)",
                        lambda: product_into(grad_weight, grad.T, chunk_hidden, accumulate=True), flops)  # fmt: skip
    if device.type != "cuda":
        return  # the fused forward kernel at N rows is minutes under the interpreter
    # the triton backend's forward kernel (tl.dot) at N rows
    inputs = make_inputs(num_rows, hidden_size, vocab_size, dtype, device, 0.5, logit_softcap=softcap)
    layout = build_row_layout(inputs["targets"], inputs["mix_index"], inputs["mix_lambda"], -100)
    hidden_slots = inputs["hidden"].detach().index_select(0, layout.rows)
    options = SFTMixLossOptions(impl="triton", logit_softcap=softcap)
    launch, _ = triton_sftmix.forward_launch(hidden_slots, inputs["weight"].detach(), None, layout, options)
    times = _time_ms(launch, device, repeats, warmup)
    forward = kernel_model.triton_cost(shape, num_rows, model_device).phases[0]
    achieved = forward.flops / (statistics.median(times) * 1e-3) / model_spec.peak_flops
    yield ("triton forward (tl.dot)", "time", "ms", times,
           f"{achieved:.0%} of {model_device} peak (model: {assumptions.triton_mma_efficiency:.0%} for tl.dot)")  # fmt: skip
    yield ("triton forward (tl.dot)", "model_time", "ms", [1e3 * forward.time_s(assumptions)], "")


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
