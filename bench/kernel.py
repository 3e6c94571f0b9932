"""Microbenchmark of the fused SFTMix loss: time and peak memory of each implementation.

    python bench/kernel.py                       # CUDA: all heads, N = 1k..16k, bf16
    python bench/kernel.py --quick               # CPU: SmolLM2's head, N = 1024 timings + N = 4096 peak memory, fp32
    python bench/kernel.py --shapes llama-3-8b --tokens 8192 --impls reference triton triton_nomix

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
upper bound since the allocator may keep freed pages.

A table goes to stdout and CSV rows (kernel, impl, mode, metric, unit, N, D, V, dtype, median, p20, p80, device,
date, version) to `--csv` (default bench/results/kernel-<device>-<date>.csv). `--check` also records, for the
peak-memory steps, each implementation's largest relative difference to the reference (loss, grads of hidden and
weight).
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
import sys
import tempfile
import time
from pathlib import Path

import torch
from kernel_model import HEADS  # (hidden size, vocabulary, logit soft cap)

IMPLS = ("reference", "compile", "torch", "triton", "triton_nomix", "rowchunk", "rowchunk_nomix", "liger")
MODES = ("fwd", "bwd", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = ("kernel", "impl", "mode", "metric", "unit", "N", "D", "V", "dtype", "median", "p20", "p80", "device", "date")
FIELDS += ("version",)
RESULTS = Path(__file__).resolve().parent / "results"
MIXUP_COEF = 0.2


def make_inputs(num_rows, hidden_size, vocab_size, dtype, device, mix_fraction, seed=0, logit_softcap=None):
    """Random head inputs; a tenth of the rows ignored (prompt); ``mix_fraction`` of the rows in mixed pairs;
    ``logit_softcap`` the head's soft cap (None: none), which every implementation applies.

    The two large tensors are drawn on the device (no multi-GB host tensor, no host-to-device copy of the weight),
    before any measurement starts; the small ones on the host.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device_gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=device_gen, device=device).to(dtype)
    weight = torch.randn(vocab_size, hidden_size, generator=device_gen, device=device).div_(hidden_size**0.5).to(dtype)
    targets = torch.randint(0, vocab_size, (num_rows,), generator=gen)
    targets[torch.rand(num_rows, generator=gen) < 0.1] = -100
    valid_rows = torch.nonzero(targets != -100).flatten()
    valid_rows = valid_rows[torch.randperm(valid_rows.numel(), generator=gen)]
    num_pairs = min(int(mix_fraction * num_rows) // 2, valid_rows.numel() // 2)
    mix_index = torch.stack([valid_rows[:num_pairs], valid_rows[num_pairs : 2 * num_pairs]], dim=1)
    return {
        "hidden": hidden.requires_grad_(),
        "weight": weight.requires_grad_(),
        "targets": targets.to(device),
        "mix_index": mix_index.to(device),
        # Beta(0.5, 0.5) is the arcsine law: sin^2(pi U / 2) for U uniform (seeded, unlike torch.distributions)
        "mix_lambda": torch.sin(torch.rand(num_pairs, generator=gen) * torch.pi / 2).square().to(device),
        "mix_weight": torch.full((num_pairs,), 1.0 / max(num_pairs, 1), device=device),
        "ntp_normalizer": (targets != -100).sum().to(device),
        "logit_softcap": logit_softcap,
    }


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
        command = [sys.executable, __file__, "--memory-probe", impl, str(num_rows), str(hidden_size)]
        command += [str(vocab_size), _dtype_name(dtype), str(mix_fraction), str(softcap), str(result_path)]
        probe = subprocess.run(command, capture_output=True, text=True, check=True)
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
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"sftmix-trl {sftmix_trl.__version__} {commit}; torch {torch.__version__}; triton {triton_version}"


def _percentiles(values):
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
    parser.add_argument("--memory-probe", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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

        def emit(shape, num_rows, impl, mode, metric, unit, values):
            median, p20, p80 = _percentiles(values)
            hidden_size, vocab_size, _ = HEADS[shape]
            row = dict(kernel="sftmix_linear_cross_entropy", impl=impl, mode=mode, metric=metric, unit=unit)
            row.update(N=num_rows, D=hidden_size, V=vocab_size, dtype=_dtype_name(dtype), device=label, date=date)
            row.update(median=f"{median:.6g}", p20=f"{p20:.6g}", p80=f"{p80:.6g}", version=version)
            writer.writerow(row)
            handle.flush()
            print(f"{shape:>13} {num_rows:>6} {impl:>13} {mode:>5} {metric + ' ' + unit:>11} "
                  f"{median:>10.4g} {p20:>10.4g} {p80:>10.4g}")  # fmt: skip

        for shape in args.shapes:
            hidden_size, vocab_size, softcap = HEADS[shape]
            for num_rows in args.tokens:
                inputs = make_inputs(
                    num_rows, hidden_size, vocab_size, dtype, device, args.mix_fraction, logit_softcap=softcap
                )
                for impl in args.impls:
                    run = loss_function(impl, inputs)
                    if run is None:
                        print(f"{shape:>13} {num_rows:>6} {impl:>13} skipped (not available on {device.type})")
                        continue
                    for mode in args.modes:
                        try:
                            times = time_mode(run, inputs, mode, repeats, warmup)
                        except torch.OutOfMemoryError:
                            print(f"{shape:>13} {num_rows:>6} {impl:>13} {mode:>5} out of memory")
                            break
                        emit(shape, num_rows, impl, mode, "time", "ms", times)
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
                    except (torch.OutOfMemoryError, subprocess.CalledProcessError) as error:
                        print(f"{shape:>13} {num_rows:>6} {impl:>13} memory probe failed: {type(error).__name__}")
                        continue
                    finally:
                        _release(device)
                    if measured is None:
                        continue
                    peak, result = measured
                    emit(shape, num_rows, impl, "full", "peak_memory", "MiB", [peak])
                    if impl == "reference":
                        reference_result = result
                    elif args.check and reference_result is not None:
                        errors = relative_errors(result, reference_result)
                        for name, error in zip(("loss", "grad_hidden", "grad_weight"), errors):
                            emit(shape, num_rows, impl, "full", f"rel_err_{name}", "1", [error])
                    del result


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
