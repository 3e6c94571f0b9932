"""Examples in and out of TRL's format: loading (`loading`), the formats (`formats`), ids (`ids`), the confidence
split (`split`) and the rows TRL's preparation keeps (`preparation`)."""

from .ids import add_example_ids, derive_example_id
from .loading import DATASET_FORMATS, load_examples
from .split import SPLIT_METHODS, ConfidenceSplit, split_by_confidence, split_examples

__all__ = [
    "DATASET_FORMATS",
    "SPLIT_METHODS",
    "ConfidenceSplit",
    "add_example_ids",
    "derive_example_id",
    "load_examples",
    "split_by_confidence",
    "split_examples",
]
