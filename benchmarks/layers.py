r"""Forward + backward time of ResNet-50's layers: XLA's lowering vs this project's forms.

  python benchmarks/layers.py [--batch=16] [--dtype=bfloat16] [--parts=pool --parts=batch_norm]
  python benchmarks/layers.py --parts=depthwise     # EfficientNet-B0 / ConvNeXt-T depthwise convs

For each ResNet-50 convolution shape (batch 16, 224 px input) it times the
gradient of a loss through `nn.Conv` (lax.conv_general_dilated) and through
`models.precision.Conv` (a matmul for 1x1 windows, lax otherwise), and the same
for the stem's 3x3/2 max-pool (`nn.max_pool` against `resnet.max_pool_3x3_s2`)
and for BatchNorm-then-ReLU on ResNet-50's activation shapes (`nn.BatchNorm`
and `nn.relu` against `batch_norm.BatchNorm(relu=True)`), and for the depthwise
convolutions of EfficientNet-B0 and ConvNeXt-T (`depthwise.DepthwiseConv` with
impl='flax', lax's grouped conv, against impl='project', shifted windows in
float32; not in the default parts). Both variants run in
the same process; compare the ratios.
"""

import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax_ft.models import batch_norm
from vit_jax_ft.models import depthwise
from vit_jax_ft.models import precision
from vit_jax_ft.models import resnet

_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per variant (best is kept).")
_PARTS = flags.DEFINE_multi_enum("parts", ["conv", "pool", "batch_norm"],
                                 ["conv", "pool", "batch_norm", "depthwise"],
                                 "Which layers to time.")

# (input side, in channels, out channels, kernel, stride): ResNet-50 v1.5's distinct convs.
CONVS = [
    (56, 64, 64, 1, 1), (56, 64, 64, 3, 1), (56, 64, 256, 1, 1), (56, 256, 64, 1, 1),
    (56, 128, 128, 3, 2), (28, 128, 512, 1, 1), (28, 512, 128, 1, 1), (28, 128, 128, 3, 1),
    (14, 256, 256, 3, 1), (14, 256, 1024, 1, 1), (14, 1024, 256, 1, 1),
    (7, 512, 512, 3, 1), (7, 512, 2048, 1, 1), (7, 2048, 512, 1, 1),
]

# (input side, channels, kernel, stride): EfficientNet-B0's depthwise convs at 224 px, then
# ConvNeXt-T's 7x7 ones.
DEPTHWISE = [(112, 32, 3, 1), (112, 96, 3, 2), (56, 144, 3, 1), (56, 144, 5, 2), (28, 240, 5, 1),
             (28, 240, 3, 2), (14, 480, 3, 1), (14, 480, 5, 1), (14, 672, 5, 1), (14, 672, 5, 2),
             (7, 1152, 5, 1), (7, 1152, 3, 1),
             (56, 96, 7, 1), (28, 192, 7, 1), (14, 384, 7, 1), (7, 768, 7, 1)]

# (side, channels): ResNet-50's BatchNorm inputs, from the stem to the last stage.
BATCH_NORMS = [(112, 64), (56, 64), (56, 256), (28, 128), (28, 512), (14, 256), (14, 1024),
               (7, 512), (7, 2048)]


def _best_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def _grad_fn(apply):
  """jitted d(loss)/d(params, x) of sum(apply(params, x)^2) in float32."""
  return jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x).astype(jnp.float32) ** 2),
                          argnums=(0, 1)))


def _compare(name: str, flops: float, variants: dict) -> None:
  times = {k: _best_seconds(*v) for k, v in variants.items()}
  base, ours = times.values()
  print(f"{name:28s} " + "  ".join(f"{k} {t * 1e3:7.1f} ms" for k, t in times.items())
        + f"  speed-up {base / ours:5.2f}x" + (f"  ({flops / ours / 1e12:.2f} TFLOP/s)"
                                                 if flops else ""), flush=True)


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  b = _BATCH.value
  rng = np.random.default_rng(0)
  print(f"device: {jax.devices()[0].device_kind}, batch {b}, {dtype.name}; "
        "forward + backward (input and weight gradients)")
  for side, cin, cout, k, s in CONVS if "conv" in _PARTS.value else []:
    kw = dict(features=cout, kernel_size=(k, k), strides=(s, s), use_bias=False, dtype=dtype,
              padding=((k // 2, k // 2),) * 2)
    x = jnp.asarray(rng.normal(size=(b, side, side, cin)), dtype)
    ref, ours = nn.Conv(**kw), precision.Conv(**kw)
    params = ref.init(jax.random.PRNGKey(0), x)
    flops = 3 * 2 * b * (side // s) ** 2 * k * k * cin * cout
    _compare(f"conv {k}x{k}/{s} {side}px {cin}->{cout}", flops, {
        "nn.Conv": (_grad_fn(ref.apply), params, x),
        "precision.Conv": (_grad_fn(ours.apply), params, x)})
  if "pool" in _PARTS.value:
    x = jnp.asarray(rng.normal(size=(b, 112, 112, 64)), dtype)
    pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2),
                             padding=((1, 1), (1, 1)))
    _compare("max-pool 3x3/2 112px 64", 0, {
        "nn.max_pool": (_grad_fn(lambda p, x: pool(x)), {}, x),
        "max_pool_3x3_s2": (_grad_fn(lambda p, x: resnet.max_pool_3x3_s2(x)), {}, x)})
  for side, channels in BATCH_NORMS if "batch_norm" in _PARTS.value else []:
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(b, side, side, channels)), dtype)
    kw = dict(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
    ref, ours = nn.BatchNorm(**kw), batch_norm.BatchNorm(relu=True, **kw)
    variables = ref.init(jax.random.PRNGKey(0), x)
    _compare(f"batch norm + relu {side}px {channels}", 0, {
        "nn.BatchNorm": (_grad_fn(_train_apply(ref, variables, nn.relu)), variables["params"], x),
        "batch_norm": (_grad_fn(_train_apply(ours, variables)), variables["params"], x)})
  for side, channels, k, s in DEPTHWISE if "depthwise" in _PARTS.value else []:
    x = jnp.asarray(rng.normal(size=(b, side, side, channels)), dtype)
    make = functools.partial(depthwise.DepthwiseConv, (k, k), (s, s),
                             ((k // 2, k // 2),) * 2, use_bias=False, dtype=dtype)
    params = make(impl="flax").init(jax.random.PRNGKey(0), x)
    flops = 3 * 2 * b * (side // s) ** 2 * k * k * channels
    _compare(f"depthwise {k}x{k}/{s} {side}px {channels}", flops, {
        "lax": (_grad_fn(make(impl="flax").apply), params, x),
        "shifted": (_grad_fn(make(impl="project").apply), params, x)})


def _train_apply(module, variables, activation=lambda y: y):
  """(params, x) -> activation(module(x)) in training mode (batch statistics)."""
  return lambda p, x: activation(module.apply({**variables, "params": p}, x,
                                              mutable=["batch_stats"])[0])


if __name__ == "__main__":
  app.run(main)
