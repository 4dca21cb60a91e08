"""Experiments over finetune runs: sweeps (an Optuna study whose trials are run folders) and their specs."""
