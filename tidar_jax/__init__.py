"""tidar-jax: TiDAR (Think in Diffusion, Talk in Autoregression) in JAX / Flax NNX."""

__version__ = "0.1.0"
