"""Confidence from training dynamics (SFTMix step 1): score every training example at K checkpoints of a reference
run, aggregate to `confidence = -mean_k ppl_k`, split into a confident and an unconfident half, and draw the data map.

    trainer.add_callback(ConfidenceCallback(trainer))          # during the reference run, or afterwards:
    score_checkpoints(["run/checkpoint-100", ...], dataset, "scores/")
    table = aggregate_scores(["run/confidence_scores"]); table.save("confidence/")
    write_data_map(table.dataset, "confidence/", examples=dataset)
"""

from .aggregate import ConfidenceTable, aggregate_scores, load_confidence, resolve_score_files
from .callback import ConfidenceCallback
from .datamap import confidence_report, draw_data_map, write_data_map
from .dynamics import TrainingDynamicsCallback
from .offline import score_checkpoints
from .scoring import read_scores, score_trainer, write_scores

__all__ = [
    "ConfidenceCallback",
    "ConfidenceTable",
    "TrainingDynamicsCallback",
    "aggregate_scores",
    "confidence_report",
    "draw_data_map",
    "load_confidence",
    "read_scores",
    "resolve_score_files",
    "score_checkpoints",
    "score_trainer",
    "write_data_map",
    "write_scores",
]
