"""Stochastic depth (Huang et al. 2016) as timm's `DropPath`: drop whole residual branches.

In training, each sample's residual branch is zeroed with probability `rate`
and kept samples are scaled by 1 / (1 - rate), so the expected output is the
branch itself. The rate grows linearly with depth (`block_rates`). The random
draws come from the 'dropout' RNG stream; there are no parameters, so weights
load and save exactly as without drop path.
"""

import jax
import jax.numpy as jnp
import numpy as np


def block_rates(rate: float, num_blocks: int) -> list[float]:
  """Per-block drop rates, linear from 0 (first block) to `rate` (last), as timm's linspace."""
  return [float(r) for r in np.linspace(0.0, rate, num_blocks)]


def sample_scale(rng: jax.Array, batch_size: int, rate: float) -> jax.Array:
  """float32 [batch_size]: 0 for a dropped sample, 1 / (1 - rate) for a kept one."""
  keep = 1.0 - rate
  kept = jax.random.bernoulli(rng, keep, (batch_size,))
  return jnp.where(kept, jnp.float32(1.0 / keep), jnp.float32(0.0))


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """x with each sample (leading axis) zeroed with probability `rate`, else scaled by 1/(1-rate).

  The product is taken in float32 (a bfloat16 1/(1-rate) would bias the
  expectation) and returned in x's dtype.
  """
  scale = sample_scale(rng, x.shape[0], rate).reshape((-1,) + (1,) * (x.ndim - 1))
  return (x.astype(jnp.float32) * scale).astype(x.dtype)
