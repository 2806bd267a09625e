r"""Interleaved A/B of the train step with and without one of the project's CPU rewrites.

  python benchmarks/ab_step.py --model=resnet50 --batch=16 --dtype=float32
  python benchmarks/ab_step.py --model=vit_b16 --batch=8 --change=flat_weight_grad

Both steps are compiled in one process and timed alternately (A, B, A, B, ...),
so the machine's drift (these shared CPUs move 10-20% between minutes) hits
both alike; the ratio of the medians is the figure to read. --change names the
rewrite that the B step switches off:

* flat_weight_grad: `precision._flat_weight_grad` (float32 kernel gradients as
  one 2-D matmul over the flattened positions).
* ynn_conv: `layer_impl.CPU_COMPILER_OPTIONS` (B compiles with XLA's default
  options, which hand convolutions to YNNPACK).
"""

import contextlib
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # runpy does not
import machine  # benchmarks/machine.py  # pylint: disable=g-bad-import-order
import train_step  # Its step set-up and its --model, --batch, --dtype, --image_size flags.

from vit_jax_ft.models import layer_impl
from vit_jax_ft.models import precision

_ROUNDS = flags.DEFINE_integer("rounds", 4, "Timed (A, B) rounds after one untimed round.")
# Each change: (module, attribute, what replaces it in the B step).
CHANGES = {
    "flat_weight_grad": (precision, "_flat_weight_grad", lambda *args: None),
    "ynn_conv": (layer_impl, "compiler_options", lambda *args, **kwargs: None),
}
_CHANGE = flags.DEFINE_enum("change", "flat_weight_grad", list(CHANGES),
                            "The rewrite the B step runs without.")


@contextlib.contextmanager
def without(change: str):
  """While tracing and compiling inside this context, `change` is switched off."""
  module, name, replacement = CHANGES[change]
  real = getattr(module, name)
  setattr(module, name, replacement)
  try:
    yield
  finally:
    setattr(module, name, real)


def compiled_step():
  """(compiled train step, [state], batch) for the flags' model, batch, dtype and size."""
  step, state, batch, _ = train_step._setup(  # pylint: disable=protected-access
      flags.FLAGS.model, flags.FLAGS.batch, flags.FLAGS.dtype, flags.FLAGS.image_size)
  return step.lower(state, batch).compile(), [state], batch


def main(argv):
  del argv
  fl = flags.FLAGS
  print(f"CPU: {machine.cpu_description()}; jax {jax.__version__}; {fl.model} batch "
        f"{fl.batch} {fl.dtype} {fl.image_size} px; B = without {_CHANGE.value}", flush=True)
  variants = {"A (as shipped)": compiled_step()}
  with without(_CHANGE.value):
    variants["B (without)"] = compiled_step()
  for label, (step, _, _) in variants.items():  # Evidence that the two programs differ.
    text = step.as_text()
    copies = sum(line.lstrip().startswith("%copy") for line in text.splitlines())
    convs = layer_impl.ynn_fusion_kinds(text)["convolution"]
    print(f"{label}: {copies} copy ops, {convs} YNNPACK convolutions in the compiled step",
          flush=True)
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
  for name, default in (("model", "resnet50"), ("batch", 16), ("dtype", "float32")):
    flags.FLAGS.set_default(name, default)  # This A/B's defaults for train_step's flags.
  app.run(main)
