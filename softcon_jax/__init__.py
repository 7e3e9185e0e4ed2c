"""softcon-jax: SoftCon and SeCo pretraining for Earth observation in JAX/Flax."""

__version__ = "0.1.0"
