"""Suite-wide settings and the fixtures every test uses.

`HF_HUB_OFFLINE=1` for the whole suite: nothing is downloaded. Without CUDA, Triton kernels run under its CPU
interpreter, which must be switched on before any kernel module is imported, hence at the top of this file.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture
def llama(tokenizer):
    return tiny.build_llama(tokenizer)


@pytest.fixture
def qwen2(tokenizer):
    return tiny.build_qwen2(tokenizer)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    """The tiny tokenizer saved to disk, for code that loads by path (subprocesses, recipes, the CLI)."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tokenizer, tmp_path_factory):
    """The tiny Llama model and its tokenizer saved to disk."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny.build_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
