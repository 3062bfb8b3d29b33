"""w2v2_jax: wav2vec 2.0 self-supervised speech pre-training in JAX/Flax."""
__version__ = "0.1.0"
