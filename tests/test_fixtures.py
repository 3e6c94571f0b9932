"""The fixtures are real: the tokenizer round-trips and renders chats, and the tiny models learn with SFTTrainer."""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch
from trl import SFTConfig, SFTTrainer

import tiny

REPO = Path(__file__).resolve().parents[1]


def test_tokenizer_round_trips_and_renders_chatml(tokenizer):
    text = "Reverse the words: cat dog bird"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = tiny.messages_dataset(1)[0]["messages"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_end|>\n")
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    mask = out["assistant_masks"]
    assistant_text = tokenizer.decode([t for t, m in zip(out["input_ids"], mask) if m])
    assert assistant_text == messages[-1]["content"] + "<|im_end|>"


@pytest.mark.parametrize("build", [tiny.build_llama, tiny.build_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize(
    "make_dataset",
    [tiny.prompt_completion_dataset, tiny.messages_dataset],
    ids=["prompt_completion", "messages"],
)
def test_tiny_model_learns_with_sft_trainer(tokenizer, tmp_path, build, make_dataset):
    model = build(tokenizer)
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_steps=24,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        assistant_only_loss=make_dataset is tiny.messages_dataset,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=make_dataset(64), processing_class=tokenizer)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv_beside_hf_kernels(tmp_path):
    """`pip install .` into a fresh venv imports both `sftmix_trl` and `sftmix_trl.kernels`, and a top-level
    `kernels` package (Hugging Face's name) stays free."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheel_dir, str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("sftmix_trl-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # the wheel goes into the fresh venv; its dependencies (torch, triton, ...) come from this environment, listed
    # after the venv's own site-packages by a .pth file
    venv_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(venv_site, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--quiet", wheel], check=True)
    probe = (
        "import importlib.util, sftmix_trl, sftmix_trl.kernels;"
        f"assert sftmix_trl.kernels.__file__.startswith({venv_site!r}), sftmix_trl.kernels.__file__;"
        "spec = importlib.util.find_spec('kernels');"
        "assert spec is None or 'sftmix_trl' not in (spec.origin or ''), spec;"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "ok"


def test_installed_kernels_live_under_sftmix_trl_only(tmp_path):
    """The (editable) install maps the top-level folder `kernels/` to `sftmix_trl.kernels`, and nothing else."""
    probe = (
        "import importlib.util, sftmix_trl.kernels;"
        "print(sftmix_trl.kernels.__file__);"
        "print(importlib.util.find_spec('kernels'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    kernels_file, top_level_spec = out.stdout.splitlines()
    assert Path(kernels_file).parent == REPO / "kernels"
    assert top_level_spec == "None" or str(REPO / "kernels" / "__init__.py") not in top_level_spec


# From the repository root, `kernels` is Hugging Face's package (transformers imports it) and `sftmix_trl.kernels` this
# repository's `kernels/` folder, in either import order.
ROOT_PROBE = """
import importlib, sys
first, second = ("kernels", "sftmix_trl.kernels") if sys.argv[-1] == "hub-first" else ("sftmix_trl.kernels", "kernels")
importlib.import_module(first)
importlib.import_module(second)
from transformers import AutoModelForCausalLM
import kernels, sftmix_trl.kernels
print(kernels.__file__)
print(sftmix_trl.kernels.__file__)
print(sftmix_trl.kernels.sftmix_linear_cross_entropy.__module__)
"""


@pytest.mark.parametrize("order", ["hub-first", "ours-first"])
@pytest.mark.parametrize("how", ["script", "module", "command"])
def test_repository_root_on_sys_path_imports_hugging_faces_kernels(how, order):
    """A script saved in the root, `python -m` and `python -c` run from the root (each puts the root on sys.path)
    import Hugging Face's `kernels` and transformers' models, and `sftmix_trl.kernels` stays this repository's."""
    name = f"_probe_kernels_{how}_{order.replace('-', '_')}_{os.getpid()}"
    script = REPO / f"{name}.py"
    command = {
        "script": [sys.executable, script.name, order],
        "module": [sys.executable, "-m", name, order],
        "command": [sys.executable, "-c", ROOT_PROBE, order],
    }[how]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        if how != "command":
            script.write_text(ROOT_PROBE)
        out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    finally:
        script.unlink(missing_ok=True)
    assert out.returncode == 0, out.stderr[-3000:]
    hub_file, ours_file, api_module = out.stdout.splitlines()
    assert Path(hub_file).is_relative_to(Path(sysconfig.get_paths()["purelib"]).resolve()), hub_file
    assert Path(ours_file) == REPO / "kernels" / "__init__.py"
    assert api_module == "sftmix_trl.kernels.functional"


def test_hugging_faces_kernels_in_the_suites_own_process():
    """pytest puts the repository root on sys.path (`pythonpath`); `import kernels` in the suite is still the hub's."""
    import kernels

    assert str(REPO) in sys.path or "." in sys.path
    assert Path(kernels.__file__).resolve() != REPO / "kernels" / "__init__.py", kernels.__file__
    assert hasattr(kernels, "get_kernel")


def test_public_api_resolves_and_kernels_import_without_trl(tmp_path):
    """Every name in `sftmix_trl.__all__` resolves, and `sftmix_trl.kernels` pulls in neither TRL nor transformers."""
    import sftmix_trl

    for name in sftmix_trl.__all__:
        assert getattr(sftmix_trl, name) is not None, name
    probe = "import sys, sftmix_trl.kernels; print(sorted(m for m in ('trl', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
