"""Shared pieces of the SFTMixTrainer tests: configs for the tiny model, scored datasets, and the loss written out
from the paper's formula (the independent oracle the trainer is checked against)."""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig

from sftmix_trl.config import SFTMixConfig

import tiny


class StopAt(TrainerCallback):
    """Stops training at the end of optimizer step `step`, as an interruption would (a resume then follows)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def with_confidence(dataset: Dataset, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    return dataset.add_column("confidence", [rng.uniform(-10.0, -1.0) for _ in range(len(dataset))])


def peaked_llama(tokenizer):
    """The tiny Llama with its LM head scaled up so that its predictions are confident (top probability near 0.97):
    on near-uniform logits the loss barely depends on lam or on the pairing, and checks against it prove little."""
    model = tiny.build_llama(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def tiny_config(output_dir, **overrides) -> SFTMixConfig:
    """fp32, no gradient checkpointing, nothing saved or reported: the exact-comparison setting."""
    return SFTMixConfig(**tiny_config_kwargs(output_dir, **overrides))


def tiny_sft_config(output_dir, **overrides) -> SFTConfig:
    """The same setting for TRL's SFTTrainer."""
    kwargs = tiny_config_kwargs(output_dir, **overrides)
    return SFTConfig(**{k: v for k, v in kwargs.items() if k in SFTConfig.__dataclass_fields__})


def tiny_config_kwargs(output_dir, **overrides) -> dict:
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        loss_impl="torch",
        dataset_num_proc=None,
    )
    kwargs.update(overrides)
    return kwargs


def loss_and_grads(trainer, batch: dict, num_items_in_batch=None, accumulation_steps: int = 1):
    """One `compute_loss` + backward in training mode; returns the loss and a copy of every parameter gradient."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = accumulation_steps
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def sftmix_loss_from_the_formula(model, batch, lambdas, mixup_coef, ntp_loss_on="all", num_items=None):
    """L = L_NTP + mu * L_Mixup, written position by position from the paper (docs/design.md §1-2), head in fp64.

    The micro-batch holds B/2 confident then B/2 unconfident sequences; pair i is (i, i + B/2). For each pair, the
    first min(|r_c|, |r_u|) response positions of both sides are mixed: h~ = lam h_c + (1 - lam) h_u, target
    lam e_{t_c} + (1 - lam) e_{t_u}; L_Mixup is the mean over pairs of each pair's mean over its mixed positions.
    """
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden = hidden.double()
    weight = model.lm_head.weight.double()
    labels = batch["labels"]
    batch_size, seq_len = labels.shape
    num_pairs = batch_size // 2

    def response_positions(b):  # positions t whose next token labels[b, t + 1] is trained on
        return [t for t in range(seq_len - 1) if labels[b, t + 1] != -100]

    ntp_rows = {"all": range(batch_size), "confident": range(num_pairs), "unconfident": range(num_pairs, batch_size)}
    nll, count = hidden.new_zeros(()), 0
    for b in ntp_rows.get(ntp_loss_on, []):
        for t in response_positions(b):
            logits = weight @ hidden[b, t]
            nll = nll + torch.logsumexp(logits, 0) - logits[labels[b, t + 1]]
            count += 1
    ntp = nll / (max(count, 1) if num_items is None else num_items)

    pair_means = []
    for i in range(num_pairs):
        confident, unconfident = response_positions(i), response_positions(num_pairs + i)
        length = min(len(confident), len(unconfident))
        if length == 0:
            continue
        lam = lambdas[i].double()
        terms = []
        for p, q in zip(confident[:length], unconfident[:length]):
            logits = weight @ (lam * hidden[i, p] + (1 - lam) * hidden[num_pairs + i, q])
            target_c, target_u = labels[i, p + 1], labels[num_pairs + i, q + 1]
            terms.append(torch.logsumexp(logits, 0) - lam * logits[target_c] - (1 - lam) * logits[target_u])
        pair_means.append(torch.stack(terms).mean())
    mixup = torch.stack(pair_means).mean() if pair_means else hidden.new_zeros(())
    return ntp + mixup_coef * mixup


REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
DEMO_CONFIG = REPO / "recipes/smollm2-135m/demo_cpu.yaml"
CONFIGS = REPO / "recipes" / "accelerate_configs"
# the recipes' configs are for GPUs: on CPU processes the runs are fp32 and every config is launched with 2 processes
CPU_OVERRIDES = ["--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict:
    """The environment of a launched process: offline, one thread each, the tests' helpers importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    # the scripts import the tests' helpers (`tiny`, `sftmix_helpers`) as the test modules do
    paths = [str(TESTS), str(TESTS / "sftmix_trl"), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("TRITON_INTERPRET", None)  # the torch implementation runs here; nothing to interpret
    return env


def run_demo_recipe(cwd: Path, output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`recipes/alpaca.py` with the demo's config and `overrides`, through `accelerate launch` as `make demo` runs
    it (one CPU process, one thread: under `make test` another test runs beside it on a 2-core machine)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--quiet", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "recipes/alpaca.py"), "--config", str(DEMO_CONFIG), "--output_dir", str(output_dir), *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return result
