"""w2v2_jax: wav2vec 2.0 self-supervised speech pre-training in JAX/Flax."""

from w2v2_jax import storage as _storage  # noqa: F401  routes every gs:// client (Orbax's too) through one backend

__version__ = "0.1.0"
