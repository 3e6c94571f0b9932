"""Random shapes, masks and lambdas (hypothesis) for the fused implementations against the fp64 oracle. Its own
module, so that the kernel tests that a GPU machine runs (`bench/gpu_check.sh`, where hypothesis may be missing)
import nothing beyond torch, triton and pytest: without hypothesis this module is skipped."""

import pytest
from kernel_cases import FUSED, make_case, oracle_errors, run_impl
from kernel_oracle import fp64_oracle

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_rows=st.integers(2, 40),
    hidden_size=st.integers(1, 24),
    vocab_size=st.integers(2, 90),
    pair_fraction=st.floats(0.0, 1.0),
    ignore_fraction=st.floats(0.0, 0.9),
    ntp_mask_fraction=st.one_of(st.none(), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**16),
    impl=st.sampled_from(FUSED),
)
def test_random_shapes_masks_and_lambdas(
    num_rows, hidden_size, vocab_size, pair_fraction, ignore_fraction, ntp_mask_fraction, seed, impl
):
    case = make_case(
        seed=seed,
        num_rows=num_rows,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        pair_fraction=pair_fraction,
        ignore_fraction=ignore_fraction,
        ntp_mask_fraction=ntp_mask_fraction,
    )
    oracle = fp64_oracle(case)
    result = run_impl(case, impl)
    assert result["num_tokens"] == oracle["num_tokens"]
    errors = oracle_errors(result, oracle)
    assert max(errors.values()) < 5e-5, errors
