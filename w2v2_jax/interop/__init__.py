"""Weights in and out of the PyTorch world (HuggingFace transformers directories)."""
