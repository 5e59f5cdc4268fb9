"""tidar-jax: TiDAR (Think in Diffusion, Talk in Autoregression) in JAX / Flax NNX.

The public API; everything else is importable from its subpackage (layout, model, decoding, training, data,
interop, evals, ops):

    from tidar_jax import Generator, SamplingParams, load_for_inference
    bundle = load_for_inference("runs/smollm2-tidar")
    gen = Generator(bundle.graphdef, bundle.params, bundle.config.model, bundle.config.decode)
"""

from tidar_jax.checkpoint.inference import InferenceBundle, load_for_inference
from tidar_jax.config import Config, ConfigError, apply_overrides, load_config
from tidar_jax.decoding.generation import GenerationResult, Generator
from tidar_jax.decoding.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "GenerationResult", "Generator", "InferenceBundle", "SamplingParams",
           "apply_overrides", "load_config", "load_for_inference"]
