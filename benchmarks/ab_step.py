r"""Interleaved A/B of the train step with and without one of the project's CPU rewrites.

  python benchmarks/ab_step.py --model=resnet50 --batch=16 --dtype=float32
  python benchmarks/ab_step.py --model=vit_b16 --batch=8 --change=flat_weight_grad

Both steps are compiled in one process and timed alternately (A, B, A, B, ...),
so the machine's drift (these shared CPUs move 10-20% between minutes) hits
both alike; the ratio of the medians is the figure to read. --change names the
rewrite that the B step switches off:

* flat_weight_grad: `precision._flat_weight_grad` (float32 kernel gradients as
  one 2-D matmul over the flattened positions).
"""

import contextlib
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # runpy does not
import machine  # benchmarks/machine.py  # pylint: disable=g-bad-import-order

from vit_jax_ft import base_config
from vit_jax_ft import models
from vit_jax_ft.models import precision
from vit_jax_ft.training import losses
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps

_MODEL = flags.DEFINE_string("model", "resnet50", "A ResNet or ViT preset (resnet50, vit_b16...).")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_IMAGE = flags.DEFINE_integer("image_size", 224, "Input side in pixels.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Timed (A, B) rounds after one untimed round.")
_CHANGE = flags.DEFINE_enum("change", "flat_weight_grad", ["flat_weight_grad"],
                            "The rewrite the B step runs without.")


@contextlib.contextmanager
def without(change: str):
  """While tracing inside this context, `change` is switched off."""
  assert change == "flat_weight_grad", change
  real = precision._flat_weight_grad  # pylint: disable=protected-access
  precision._flat_weight_grad = lambda *args: None  # pylint: disable=protected-access
  try:
    yield
  finally:
    precision._flat_weight_grad = real  # pylint: disable=protected-access


def compiled_step(dtype):
  """(compiled train step, [state], batch) for the flags' model at `dtype`."""
  name = _MODEL.value
  cfg = (base_config.vit_model_config(name) if name.startswith("vit")
         else base_config.resnet_model_config(name))
  model = models.create_model(cfg, 1000, dtype)
  config = base_config.get_base_config()
  tx = optim.make_optimizer(config.optimizer,
                            optim.learning_rate_schedule(config.optimizer, 1000))
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   loss_fn=losses.get_loss_fn(config.loss)), donate_argnums=0)
  state = steps.create_train_state(model, tx, _IMAGE.value, seed=0)
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  batch = {"image": jax.random.normal(k1, (_BATCH.value, _IMAGE.value, _IMAGE.value, 3)),
           "targets": jax.nn.one_hot(jax.random.randint(k2, (_BATCH.value,), 0, 1000), 1000)}
  return step.lower(state, batch).compile(), [state], batch


def main(argv):
  del argv
  dtype = jnp.float32 if _DTYPE.value == "float32" else jnp.bfloat16
  print(f"CPU: {machine.cpu_description()}; jax {jax.__version__}; {_MODEL.value} batch "
        f"{_BATCH.value} {_DTYPE.value} {_IMAGE.value} px; B = without {_CHANGE.value}",
        flush=True)
  variants = {"A (as shipped)": compiled_step(dtype)}
  with without(_CHANGE.value):
    variants["B (without)"] = compiled_step(dtype)
  for label, (step, _, _) in variants.items():  # Evidence that the two programs differ.
    copies = sum(line.lstrip().startswith("%copy") for line in step.as_text().splitlines())
    print(f"{label}: {copies} copy ops in the compiled step", flush=True)
  times = {label: [] for label in variants}
  for round_ in range(_ROUNDS.value + 1):
    for label, (step, state, batch) in variants.items():
      start = time.perf_counter()
      state[0], metrics = step(state[0], batch)
      jax.block_until_ready(metrics["loss"])
      if round_:  # The first round is warm-up.
        times[label].append(time.perf_counter() - start)
  for label, ts in times.items():
    print(f"{label}: median {statistics.median(ts) * 1e3:.2f} ms/step "
          f"({', '.join(f'{t * 1e3:.1f}' for t in ts)})")
  ratio = statistics.median(times["B (without)"]) / statistics.median(times["A (as shipped)"])
  print(f"A / B speed: {ratio:.2f}x")


if __name__ == "__main__":
  app.run(main)
