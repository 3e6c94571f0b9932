"""SFTMix instruction tuning (arXiv 2410.05248) as a plugin to Hugging Face TRL.

The public names are imported lazily, so that ``import sftmix_trl.kernels`` needs only torch and triton.
"""

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY_EXPORTS: dict[str, str] = {
    "BalancedPairSampler": "sampler",
    "ConfidenceCallback": "confidence",
    "ConfidenceTable": "confidence",
    "TrainingDynamicsCallback": "confidence",
    "train_one_run": "one_run",
    "add_example_ids": "data",
    "load_examples": "data",
    "aggregate_scores": "confidence",
    "load_confidence": "confidence",
    "score_checkpoints": "confidence",
    "write_data_map": "confidence",
    "SFTMixConfig": "config",
    "SFTMixTrainer": "trainer",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        module = importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
