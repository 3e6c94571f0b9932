"""Density of the SFTMix loss's logit gradient at bf16 resolution: what gradient filtering could skip, on real logits.

    python -m bench.grad_density                  # SmolLM2-135M-Instruct on 32 Alpaca demo rows, ~2k response tokens
    python -m bench.grad_density --sequences 8    # a quick look

Gradient filtering (Cut Cross-Entropy) skips a tile's backward products (dH += G W, dW += G^T H) when every entry
of the tile of G = dL/dz is below bf16's resolution. This measures, on the logits of the demo's model and data, the
share of (64-row x 128-column) tiles of G with at least one live entry, |G[n, v]| >= 2**-12 * s_n, for two row
scales s_n: "max", the row's own largest |G| (the strict reading: relative to what the row holds, so a confident
row's small gradient keeps its resolution), and "bound", the bound of the row's entries (|softmax - y| <= 1 times
its loss weights, `gradient_bound`): CCE's absolute filter on the softmax. Both cancel the loss's normalizers. In
the vocabulary's own order and with the columns sorted by their mean logit over the call's rows, descending (CCE's
trick, which clusters the live entries). 2**-8 and 2**-16 show the sensitivity to the threshold.

Rows: the response tokens only (prompt and padding rows carry no gradient), in the order the kernels see them (the
slots of `kernels.layout`: the p rows of the mixed pairs, their q rows, then the other rows), one call per
micro-batch of `--batch_size` sequences, as SFTMixTrainer forms them. Sequences: the demo's Alpaca rows
(`python -m sftmix_trl.assets`), a seeded random subset, chat template as the recipe applies it (TRL's
prompt/completion format: the completion tokens are the response), truncated to `--max_length`.

G per row (docs/design.md §2): ``(softmax(z_n) - e_{t_n}) / num_items``, and with mixing, for the l-th response position
of each pair (p, q): ``+ mu * w * lam * (softmax(z~) - y~)`` on p, ``(1 - lam)`` on q, z~ = lam z_p + (1 - lam) z_q,
w = 1 / (L_pq * number of pairs), lam ~ Beta(0.5, 0.5) per pair. The pairs are random: the micro-batch's sequences
are split into halves and paired at random, not by confidence (which only decides who meets whom, not the shape of
a row's gradient).

A table goes to stdout and CSV rows (one per mixing x column order x threshold) to `--csv` (default
bench/results/grad-density-cpu-<date>.csv): counts and shares only, no text of the data set (Alpaca is
non-commercial). ``tile_density_128k_est`` projects to a 128k vocabulary under stated assumptions (see
`project_density`): an estimate, not a measurement.
"""

import argparse
import csv
import datetime
from pathlib import Path

import torch

from sftmix_trl.kernels.layout import build_row_layout

from .kernel import device_label, version_label

RESULTS = Path(__file__).resolve().parent / "results"
TILE_ROWS, TILE_COLS = 64, 128
THRESHOLDS_LOG2 = (-8, -12, -16)  # -12: the bf16 resolution; the others show the sensitivity
LLAMA3_VOCAB = 128256
FIELDS = (
    "bench", "model", "vocab", "rows", "sequences", "batch_size", "max_length", "mixup", "row_scale", "column_order",
    "threshold_log2", "tile_rows", "tile_cols", "tiles", "live_tiles", "tile_density", "entry_density",
    "live_per_row_mean", "tile_density_128k_est", "device", "date", "version",
)  # fmt: skip


def logit_gradient(logits, targets, mix_index, mix_lambda, ntp_scale, mix_scale):
    """G = dL/dz (N x V, fp32) of L = ntp_scale * sum_n CE(z_n, t_n) + sum_k mix_scale_k * CE(z~_k, y~_k)."""
    grad = torch.softmax(logits, dim=-1)
    # softmax - e_t, the target column corrected in fp32
    grad[torch.arange(len(targets)), targets] -= 1
    grad *= ntp_scale
    if len(mix_index):
        p_rows, q_rows = mix_index[:, 0], mix_index[:, 1]
        lam = mix_lambda[:, None]
        # z~ = lam z_p + (1 - lam) z_q; dl_mix/dz~ = softmax(z~) - lam e_{t_p} - (1 - lam) e_{t_q}
        mixed_grad = torch.softmax(lam * logits[p_rows] + (1 - lam) * logits[q_rows], dim=-1)
        pairs = torch.arange(len(mix_index))
        mixed_grad[pairs, targets[p_rows]] -= mix_lambda
        mixed_grad[pairs, targets[q_rows]] -= 1 - mix_lambda
        mixed_grad *= mix_scale[:, None]
        # dz~/dz_p = lam, dz~/dz_q = 1 - lam
        grad.index_add_(0, p_rows, lam * mixed_grad)
        grad.index_add_(0, q_rows, (1 - lam) * mixed_grad)
    return grad


def gradient_bound(num_rows, mix_index, mix_lambda, ntp_scale, mix_scale):
    """Per row, the bound of its |G| entries (|softmax - y| <= 1): ntp_scale, plus lam mu w on p, (1 - lam) mu w on
    q. Against it, 2**-12 is CCE's absolute filter on the softmax (for an unmixed row)."""
    bound = torch.full((num_rows,), float(ntp_scale), dtype=mix_lambda.dtype)
    if len(mix_index):
        bound.index_add_(0, mix_index[:, 0], mix_lambda * mix_scale)
        bound.index_add_(0, mix_index[:, 1], (1 - mix_lambda) * mix_scale)
    return bound


def live_entries(grad, threshold, row_scale=None):
    """|G| >= threshold * the row's scale: its largest |G| (None) or a given (N,) scale. The entries at bf16
    resolution."""
    magnitude = grad.abs()
    if row_scale is None:
        row_scale = magnitude.amax(dim=1)
    return magnitude >= threshold * row_scale[:, None]


def live_tiles(live, tile_rows=TILE_ROWS, tile_cols=TILE_COLS):
    """(rows / tile_rows) x (columns / tile_cols) bool: a tile is live when any entry is (partial edge tiles too)."""
    num_rows, num_cols = live.shape
    padded = torch.zeros(
        -(-num_rows // tile_rows) * tile_rows, -(-num_cols // tile_cols) * tile_cols, dtype=torch.bool
    )
    padded[:num_rows, :num_cols] = live
    return padded.view(padded.shape[0] // tile_rows, tile_rows, -1, tile_cols).any(dim=3).any(dim=1)


def mean_logit_order(logits):
    """The columns by their mean logit over the rows, largest first (CCE's vocabulary sorting)."""
    return torch.argsort(logits.mean(dim=0), descending=True)


def project_density(density, vocab, target_vocab, column_order):
    """Tile density at ``target_vocab``, assuming each row keeps its number of live entries (the plausible next
    tokens do not multiply with the vocabulary). Vocabulary order: live entries scattered at random, a tile is
    dead with probability (1 - d) ** (vocab / target_vocab) per its share of columns. Sorted: the live columns are
    the same absolute number at the head of the order, so the live share falls as vocab / target_vocab."""
    if column_order == "vocab":
        return 1 - (1 - density) ** (vocab / target_vocab)
    return density * vocab / target_vocab


def random_pairs(lengths, generator):
    """(i, j) sequence pairs of one micro-batch: the sequences split at random into two halves, paired at random."""
    order = torch.randperm(len(lengths), generator=generator)
    half = len(order) // 2
    return list(zip(order[:half].tolist(), order[half : 2 * half].tolist()))


def micro_batch_rows(response_lengths, mixup, mixup_coef, alpha, generator):
    """(mix_index, mix_lambda, ntp_scale, mix_scale) over a micro-batch's response rows, sequence after sequence:
    pairs aligned position by position over the shorter response (docs/design.md §2)."""
    starts = torch.tensor([0, *response_lengths]).cumsum(0)
    num_items = starts[-1].item()
    rows, lambdas, weights = [], [], []
    pairs = random_pairs(response_lengths, generator) if mixup else []
    # lam ~ Beta(alpha, alpha) per pair, from torch's global generator (main seeds it)
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    for i, j in pairs:
        length = min(response_lengths[i], response_lengths[j])
        if length == 0:
            continue
        positions = torch.arange(length)
        rows.append(torch.stack([starts[i] + positions, starts[j] + positions], dim=1))
        lambdas.append(beta.sample().expand(length))
        weights.append(torch.full((length,), mixup_coef / (length * len(pairs))))
    if not rows:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 1 / num_items, torch.zeros(0)
    return torch.cat(rows), torch.cat(lambdas), 1 / num_items, torch.cat(weights)


def call_counts(logits, targets, mix_index, mix_lambda, ntp_scale, mix_scale, thresholds):
    """{(row_scale, column_order, threshold): (tiles, live tiles, live entries, rows)} of one call, rows in slot
    order; row_scale "max" (the row's largest |G|) or "bound" (`gradient_bound`)."""
    grad = logit_gradient(logits, targets, mix_index, mix_lambda, ntp_scale, mix_scale)
    bound = gradient_bound(len(targets), mix_index, mix_lambda, ntp_scale, mix_scale)
    slots = build_row_layout(targets, mix_index, mix_lambda, ignore_index=-100).rows
    grad, scales = grad[slots], {"max": None, "bound": bound[slots]}
    orders = {"vocab": None, "sorted": mean_logit_order(logits)}
    counts = {}
    for order, columns in orders.items():
        ordered = grad if columns is None else grad[:, columns]
        for scale, row_scale in scales.items():
            for threshold in thresholds:
                live = live_entries(ordered, threshold, row_scale)
                tiles = live_tiles(live)
                counts[scale, order, threshold] = (tiles.numel(), int(tiles.sum()), int(live.sum()), live.shape[0])
    return counts


def load_sequences(num_sequences, max_length, seed):
    """Token ids of the demo's Alpaca rows with the chat template, and each one's number of prompt tokens."""
    import json

    from transformers import AutoTokenizer

    from sftmix_trl.assets import alpaca_demo_path, smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    rows = json.loads(Path(alpaca_demo_path()).read_text())
    picked = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:num_sequences].tolist()
    sequences = []
    for index in picked:
        row = rows[index]
        user = f"{row['instruction'].strip()}\n\n{row['input'].strip()}" if row.get("input") else row["instruction"]
        prompt = [{"role": "user", "content": user.strip()}]
        completion = [{"role": "assistant", "content": row["output"]}]
        # TRL's prompt/completion tokenization: the prompt with the generation prompt, then the whole conversation
        prompt_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
        if len(prompt_ids) + 1 < min(len(ids), max_length):
            sequences.append((torch.tensor(ids[:max_length]), len(prompt_ids)))
    return sequences


@torch.no_grad()
def response_logits(model, sequences):
    """Per sequence: the logits (fp32) of its rows whose next token is a response token, and those targets."""
    weight = model.get_output_embeddings().weight.float()
    out = []
    for ids, prompt_length in sequences:
        hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
        # row i predicts token i + 1: the response rows are prompt_length - 1 .. len - 2
        rows = slice(prompt_length - 1, len(ids) - 1)
        out.append((hidden[rows].float() @ weight.T, ids[prompt_length:]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32, help="Alpaca demo rows (seeded random subset)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per micro-batch (the demo's)")
    parser.add_argument("--max_length", type=int, default=160, help="tokens per sequence (the demo's)")
    parser.add_argument("--mixup_coef", type=float, default=0.2)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    from transformers import AutoModelForCausalLM

    from sftmix_trl.assets import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    sequences = load_sequences(args.sequences, args.max_length, args.seed)
    per_sequence = response_logits(model, sequences)
    vocab = per_sequence[0][0].shape[1]
    thresholds = [2.0**e for e in THRESHOLDS_LOG2]
    totals = {}
    for mixup in (False, True):
        for first in range(0, len(per_sequence), args.batch_size):
            batch = per_sequence[first : first + args.batch_size]
            logits = torch.cat([z for z, _ in batch])
            targets = torch.cat([t for _, t in batch])
            lengths = [len(t) for _, t in batch]
            mix_index, mix_lambda, ntp_scale, mix_scale = micro_batch_rows(
                lengths, mixup, args.mixup_coef, args.alpha, generator
            )
            counts = call_counts(logits, targets, mix_index, mix_lambda, ntp_scale, mix_scale, thresholds)
            for (scale, order, threshold), values in counts.items():
                key = (mixup, scale, order, threshold)
                totals[key] = [a + b for a, b in zip(totals.get(key, (0, 0, 0, 0)), values)]

    date = datetime.date.today().isoformat()
    csv_path = args.csv or RESULTS / f"grad-density-cpu-{date}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    common = dict(bench="grad_density", model="smollm2-135m-instruct", vocab=vocab, sequences=len(sequences))
    common |= dict(batch_size=args.batch_size, max_length=args.max_length, tile_rows=TILE_ROWS, tile_cols=TILE_COLS)
    common |= dict(device=device_label(torch.device("cpu")), date=date, version=version_label())
    print(f"# SmolLM2-135M-Instruct (V = {vocab}), {len(sequences)} Alpaca demo sequences -> {csv_path}")
    print(f"{'mixup':>6} {'scale':>6} {'columns':>8} {'thresh':>7} {'rows':>6} {'tiles':>7} {'live':>7} {'density':>8} "
          f"{'entries':>9} {'live/row':>9} {'128k est':>9}")  # fmt: skip
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for (mixup, scale, order, threshold), (tiles, live, entries, rows) in totals.items():
            density = live / tiles
            projected = project_density(density, vocab, LLAMA3_VOCAB, order)
            row = dict(
                rows=rows,
                mixup=mixup,
                row_scale=scale,
                column_order=order,
                threshold_log2=int(torch.tensor(threshold).log2()),
            )
            row |= dict(tiles=tiles, live_tiles=live, tile_density=f"{density:.4f}")
            row |= dict(entry_density=f"{entries / (rows * vocab):.3g}", live_per_row_mean=f"{entries / rows:.1f}")
            row |= dict(tile_density_128k_est=f"{projected:.4f}")
            writer.writerow(common | row)
            print(f"{str(mixup):>6} {scale:>6} {order:>8} {'2^' + str(row['threshold_log2']):>7} {rows:>6} {tiles:>7} {live:>7} "
                  f"{density:>8.3f} {entries / (rows * vocab):>9.2e} {entries / rows:>9.1f} {projected:>9.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
