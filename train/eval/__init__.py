"""Evaluation: the run's `Evaluator`, decoding, answer scoring, the GSM8K/MATH/HumanEval harness
and its sandbox, and the `python -m train.eval` command line."""
