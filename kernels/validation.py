"""Input checks of the SFTMix loss.

Shape, dtype and device checks read only metadata and always run. The data checks (values of targets, mixed rows,
lambdas, weights and a tensor normalizer) are reduced on the device to one flag per check and read back with a
single host sync; they run when ``validate=True`` (the default). A caller that builds the mixing plan itself and
has checked it (the trainer) can pass ``validate=False`` to keep the loss free of host syncs.
"""

import math

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _require(condition: bool, message: str, error=ValueError):
    if not condition:
        raise error(message)


def check_metadata(hidden, weight, targets, mix_index, mix_lambda, mix_weight, bias, ntp_normalizer, ntp_mask=None):
    """Shapes, dtypes and devices; raises TypeError / ValueError naming the argument and what to pass instead."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("targets", targets), ("mix_index", mix_index)):
        _require(isinstance(tensor, torch.Tensor), f"{name} must be a torch.Tensor, got {type(tensor)}.", TypeError)
    _require(hidden.dim() == 2, f"hidden must be (N, D), got shape {tuple(hidden.shape)}; flatten the batch first.")
    _require(weight.dim() == 2, f"weight must be (V, D), got shape {tuple(weight.shape)}.")
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    _require(
        weight.shape[1] == hidden_size,
        f"weight (V, D) = {tuple(weight.shape)} does not match hidden (N, D) = {tuple(hidden.shape)} on D.",
    )
    _require(
        hidden.dtype in FLOAT_DTYPES,
        f"hidden must be floating point ({FLOAT_DTYPES}), got {hidden.dtype}.",
        TypeError,
    )
    _require(
        weight.dtype == hidden.dtype,
        f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one of them.",
        TypeError,
    )
    if bias is not None:
        _require(isinstance(bias, torch.Tensor), f"bias must be a tensor or None, got {type(bias)}.", TypeError)
        _require(bias.shape == (vocab_size,), f"bias must be (V,) = ({vocab_size},), got {tuple(bias.shape)}.")
        _require(bias.dtype == weight.dtype, f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}.")
    _require(
        targets.shape == (num_rows,),
        f"targets must be (N,) = ({num_rows},) like hidden's rows, got {tuple(targets.shape)}.",
    )
    _require(
        not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool,
        f"targets must be an integer tensor (int64), got {targets.dtype}.",
        TypeError,
    )
    _require(
        mix_index.dim() == 2 and mix_index.shape[1] == 2,
        f"mix_index must be (P, 2) rows (p, q), got shape {tuple(mix_index.shape)}; use shape (0, 2) for no mixing.",
    )
    _require(
        not mix_index.is_floating_point() and mix_index.dtype != torch.bool,
        f"mix_index must be an integer tensor (int64), got {mix_index.dtype}.",
        TypeError,
    )
    if ntp_mask is not None:
        _require(
            isinstance(ntp_mask, torch.Tensor), f"ntp_mask must be a tensor or None, got {type(ntp_mask)}.", TypeError
        )
        _require(
            ntp_mask.shape == (num_rows,),
            f"ntp_mask must be (N,) = ({num_rows},) like hidden's rows, got {tuple(ntp_mask.shape)}.",
        )
        _require(ntp_mask.dtype == torch.bool, f"ntp_mask must be a bool tensor, got {ntp_mask.dtype}.", TypeError)
    num_pairs = mix_index.shape[0]
    _require(num_rows > 0 or num_pairs == 0, "mix_index names rows but hidden has none (N = 0).")
    for name, tensor in (("mix_lambda", mix_lambda), ("mix_weight", mix_weight)):
        _require(isinstance(tensor, torch.Tensor), f"{name} must be a torch.Tensor, got {type(tensor)}.", TypeError)
        _require(tensor.shape == (num_pairs,), f"{name} must be (P,) = ({num_pairs},), got {tuple(tensor.shape)}.")
        _require(tensor.is_floating_point(), f"{name} must be floating point, got {tensor.dtype}.", TypeError)
    tensors = {"weight": weight, "targets": targets, "mix_index": mix_index, "mix_lambda": mix_lambda}
    tensors.update(mix_weight=mix_weight, bias=bias, ntp_mask=ntp_mask)
    if isinstance(ntp_normalizer, torch.Tensor):
        tensors["ntp_normalizer"] = ntp_normalizer
        _require(
            ntp_normalizer.numel() == 1,
            f"ntp_normalizer must be a 0-dim tensor, got shape {tuple(ntp_normalizer.shape)}.",
        )
    elif ntp_normalizer is not None:
        _require(
            isinstance(ntp_normalizer, int | float) and not isinstance(ntp_normalizer, bool),
            f"ntp_normalizer must be None, a number or a 0-dim tensor, got {type(ntp_normalizer)}.",
            TypeError,
        )
        _require(
            math.isfinite(ntp_normalizer) and ntp_normalizer > 0,
            f"ntp_normalizer must be finite and > 0, got {ntp_normalizer}.",
        )
    for name, tensor in tensors.items():
        if tensor is not None and name != "ntp_normalizer":
            _require(
                tensor.device == hidden.device,
                f"{name} is on {tensor.device} but hidden is on {hidden.device}; move it.",
            )


def check_data(hidden, weight, targets, mix_index, mix_lambda, mix_weight, ntp_normalizer, ignore_index):
    """Value checks, reduced on the device and read back with one host sync."""
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    checks = [
        (
            (~valid | ((targets >= 0) & (targets < vocab_size))).all(),
            lambda: (
                f"targets must be in [0, {vocab_size}) or ignore_index={ignore_index}; found "
                f"{targets[valid & ((targets < 0) | (targets >= vocab_size))][:5].tolist()}."
            ),
        ),
        (
            ((mix_index >= 0) & (mix_index < num_rows)).all(),
            lambda: (
                f"mix_index rows must be in [0, N={num_rows}); found "
                f"{mix_index[(mix_index < 0) | (mix_index >= num_rows)][:5].tolist()}."
            ),
        ),
        (
            torch.isfinite(mix_lambda).all() & (mix_lambda >= 0).all() & (mix_lambda <= 1).all(),
            lambda: (
                f"mix_lambda must be finite and in [0, 1]; found "
                f"{mix_lambda[~(torch.isfinite(mix_lambda) & (mix_lambda >= 0) & (mix_lambda <= 1))][:5].tolist()}."
            ),
        ),
        (
            torch.isfinite(mix_weight).all(),
            lambda: f"mix_weight must be finite; found {mix_weight[~torch.isfinite(mix_weight)][:5].tolist()}.",
        ),
    ]
    # Clamped so that the checks below index safely even when the range check above fails (it reports first).
    p_rows, q_rows = mix_index.clamp(0, max(num_rows - 1, 0)).unbind(1)
    mixed_valid = valid[p_rows] & valid[q_rows]
    # A row sits in at most one mixed position; (n, n) counts once.
    rows = torch.cat([p_rows, q_rows[q_rows != p_rows]])
    uses = torch.zeros(num_rows, dtype=torch.int32, device=rows.device)
    uses.index_add_(0, rows, torch.ones_like(rows, dtype=torch.int32))
    checks += [
        (
            mixed_valid.all(),
            lambda: (
                "mix_index must name rows with a valid target (not ignore_index); mixed positions "
                f"{torch.nonzero(~mixed_valid).flatten()[:5].tolist()} touch ignored rows."
            ),
        ),
        (
            (uses <= 1).all(),
            lambda: (
                f"each row may sit in at most one mixed position; rows "
                f"{torch.nonzero(uses > 1).flatten()[:5].tolist()} appear in several. Pair each response position once."
            ),
        ),
    ]
    if isinstance(ntp_normalizer, torch.Tensor):
        checks.append(
            (
                torch.isfinite(ntp_normalizer).all() & (ntp_normalizer > 0).all(),
                lambda: f"ntp_normalizer must be finite and > 0, got {ntp_normalizer.item()}.",
            )
        )
    flags = torch.stack([flag for flag, _ in checks]).tolist()  # the one host sync
    for ok, (_, message) in zip(flags, checks):
        _require(ok, message())
