"""The kernels compile once per model, not once per batch: Triton's own launcher binding (the code that decides
which compiled variant a launch needs) sees the same specialization for launches that differ only in the token
count. It runs in a subprocess without TRITON_INTERPRET (the interpreter has no compiled variants), for a CUDA
target; nothing is launched."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

BIND = textwrap.dedent(
    """
    import json, sys
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from sftmix_trl.kernels import triton_sftmix
    from sftmix_trl.kernels.layout import build_row_layout
    from sftmix_trl.kernels.options import SFTMixLossOptions

    backend = make_backend(GPUTarget("cuda", 90, 32))


    def cache_key(launch):
        kernel = launch.kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        _, specialization, options = binder(**launch.kwargs())
        return compute_cache_key({}, specialization, options)


    def keys(num_rows, num_pairs, hidden_size):
        gen = torch.Generator().manual_seed(num_rows)
        weight = torch.randn(512, hidden_size, dtype=torch.bfloat16)
        hidden = torch.randn(num_rows, hidden_size, dtype=torch.bfloat16)
        targets = torch.randint(0, 512, (num_rows,), generator=gen)
        mix_index = torch.randperm(num_rows, generator=gen)[: 2 * num_pairs].reshape(num_pairs, 2)
        layout = build_row_layout(targets, mix_index, torch.rand(num_pairs, generator=gen), -100)
        options = SFTMixLossOptions(impl="triton")
        slots = hidden.index_select(0, layout.rows)
        forward, _ = triton_sftmix.forward_launch(slots, weight, None, layout, options)
        per_slot, per_pair = torch.zeros(layout.rows.numel()), torch.zeros(num_pairs)
        inputs = triton_sftmix.LogitGradInputs(per_slot, per_pair, per_slot, per_pair)
        grad_logits = torch.empty(layout.rows.numel(), 128, dtype=torch.bfloat16)
        grads = [
            triton_sftmix.logit_grad_launch(
                slots, weight, None, layout, options, inputs, grad_logits[:, :width], start
            )
            for start, width in ((0, 128), (384, 112))
        ]
        return [cache_key(forward), *(cache_key(launch) for launch in grads)]


    print(json.dumps({f"{n}-{p}-{d}": keys(n, p, d) for n, p, d in json.loads(sys.argv[1])}))
    """
)


def bound_keys(shapes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", BIND, json.dumps(shapes)], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_token_counts_share_one_compiled_variant_and_the_hidden_size_does_not():
    """N = 1,000 (P = 250) and N = 1,537 (P = 1, an odd N, P == 1) bind to the same variant of each kernel, and a
    full and a partial backward chunk to the same one; a hidden size not divisible by 16 (a specialized argument)
    binds to another, so the comparison can fail."""
    keys = bound_keys([[1000, 250, 64], [1537, 1, 64], [1000, 250, 72]])
    first, second, other_width = keys["1000-250-64"], keys["1537-1-64"], keys["1000-250-72"]
    assert first == second
    assert first[1] == first[2]  # the two chunks of the backward
    assert other_width[0] != first[0] and other_width[1] != first[1]
