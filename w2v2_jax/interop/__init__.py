"""Weights in and out: HuggingFace directories, fairseq checkpoints, and one loader for fine-tuning and inference."""
