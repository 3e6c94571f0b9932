"""Evaluating trained models beyond the held-out loss: answers to instruction-following benchmarks in the format their
judges read (`answers`: MT-Bench, AlpacaEval), and EleutherAI's lm-evaluation-harness tasks (`lm_eval_tasks`: the
paper's healthcare suite)."""
