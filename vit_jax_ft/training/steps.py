"""The train state and the pure, jittable train and eval steps."""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from vit_jax_ft.training import metrics as metrics_lib


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped."""

  step: jax.Array
  params: Any
  batch_stats: Any  # BatchNorm running statistics; {} for models without them.
  opt_state: Any
  rng: jax.Array
  # Dynamic loss scaling for float16 (constant 1 otherwise): the current scale
  # and the number of finite steps since it last changed.
  loss_scale: jax.Array
  good_steps: jax.Array
  # Reduce-on-plateau: a factor on every update (1 until a plateau), and the
  # step of the last reduction.
  lr_scale: jax.Array
  lr_scale_step: jax.Array
  # Exponential moving average of the weights, {"params", "batch_stats"}
  # (see Ema); {} when config.ema_decay is 0, so that no copy is kept.
  ema: Any = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class LossScaling:
  """float16 dynamic loss scaling: double after `period` finite steps, halve on overflow."""

  enabled: bool = flax.struct.field(pytree_node=False, default=False)
  period: int = flax.struct.field(pytree_node=False, default=2000)

  def update(self, state: TrainState, finite: jax.Array) -> tuple[jax.Array, jax.Array]:
    """New (loss_scale, good_steps) after a step whose gradients were `finite`."""
    grow = finite & (state.good_steps + 1 >= self.period)
    scale = jnp.where(finite, jnp.where(grow, state.loss_scale * 2.0, state.loss_scale),
                      jnp.maximum(state.loss_scale / 2.0, 1.0))
    good = jnp.where(finite & ~grow, state.good_steps + 1, 0)
    return scale, good.astype(jnp.int32)


@flax.struct.dataclass
class Ema:
  """Exponential moving average of the weights, updated after every optimizer step.

  ema = decay_t * ema + (1 - decay_t) * new, over the parameters and the
  BatchNorm running statistics alike (as timm's ModelEmaV2 averages every
  buffer). With `warmup`, decay_t = min(decay, (1 + t) / (10 + t)), t the
  number of steps taken before this one (TF ExponentialMovingAverage's
  num_updates rule): the average forgets its starting weights fast early on.
  """

  decay: float = flax.struct.field(pytree_node=False, default=0.0)
  warmup: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def enabled(self) -> bool:
    return self.decay > 0

  def decay_at(self, t: jax.Array) -> jax.Array:
    """decay_t for the update after `t` earlier steps."""
    if not self.warmup:
      return jnp.asarray(self.decay, jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    return jnp.minimum(jnp.float32(self.decay), (1.0 + t) / (10.0 + t))

  def update(self, ema: Any, params: Any, batch_stats: Any, t: jax.Array) -> dict:
    """The average after a step that produced `params` and `batch_stats`."""
    d = self.decay_at(t)
    new = {"params": params, "batch_stats": batch_stats}
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, new)


def init_ema(state: TrainState) -> TrainState:
  """`state` with its EMA started at its current weights (own buffers: the step donates)."""
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  return state.replace(ema={"params": copy(state.params), "batch_stats": copy(state.batch_stats)})


def ema_weights(state: TrainState) -> TrainState:
  """`state` with the EMA weights in place of the trained ones (for eval_step)."""
  return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def create_train_state(model, tx: optax.GradientTransformation, image_size: int,
                       seed: int, init_loss_scale: float = 1.0) -> TrainState:
  """Initialises parameters (float32) and optimizer state."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(init_rng)
  params = variables["params"]
  return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params), rng=train_rng,
                    loss_scale=jnp.asarray(init_loss_scale, jnp.float32),
                    good_steps=jnp.asarray(0, jnp.int32),
                    lr_scale=jnp.asarray(1.0, jnp.float32),
                    lr_scale_step=jnp.asarray(0, jnp.int32))


def _variables(params, batch_stats) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _stop_frozen(params, frozen):
  """Frozen leaves (True in `frozen`) as constants: exact zero gradients, and XLA
  drops the backward pass that only they needed (all of it below a trained head)."""
  if frozen is None:
    return params
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)


def _loss_and_grads(model, loss_fn, params, batch_stats, batch, rng, scale=1.0, frozen=None):
  """Mean loss over `batch`, its gradients, new BatchNorm stats and logits.

  The gradients are of `loss * scale` (loss scaling keeps small float16
  gradients from flushing to zero); the caller divides them by `scale`.
  """

  def compute(p):
    variables = _variables(_stop_frozen(p, frozen), batch_stats)
    if batch_stats:
      logits, mutated = model.apply(variables, batch["image"], train=True,
                                    rngs={"dropout": rng}, mutable=["batch_stats"])
      new_stats = mutated["batch_stats"]
    else:
      logits = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng})
      new_stats = batch_stats
    loss = jnp.mean(loss_fn(logits, batch["targets"]))
    return loss * scale, (loss, new_stats, logits)

  (_, (loss, new_stats, logits)), grads = jax.value_and_grad(compute, has_aux=True)(params)
  return loss, grads, new_stats, logits


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               loss_fn: Callable, accum_steps: int = 1,
               scaling: LossScaling = LossScaling(),
               ema: Ema = Ema(), frozen: Any = None) -> tuple[TrainState, dict]:
  """One optimizer step on `batch`.

  With accum_steps > 1 the batch is split into that many micro-batches whose
  gradients are averaged before the single update: the same update as the
  whole batch at once (BatchNorm statistics aside), with less activation
  memory. With loss scaling enabled, a step whose gradients are not finite
  changes nothing but the scale (it is skipped and reported as such), the
  weights' moving average (`ema`, updated after the optimizer step) included.
  `frozen` (bools like the parameters, or None) marks parameters that get
  zero gradients (see optim.ParamGroups.frozen_mask).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  scale = state.loss_scale
  if accum_steps == 1:
    loss, grads, batch_stats, logits = _loss_and_grads(
        model, loss_fn, state.params, state.batch_stats, batch, rng, scale, frozen)
    correct = jnp.argmax(logits, -1) == jnp.argmax(batch["targets"], -1)
  else:
    micro = jax.tree.map(lambda x: x.reshape((accum_steps, -1) + x.shape[1:]), batch)

    def body(carry, xs):
      grads_sum, loss_sum, stats = carry
      mb, i = xs
      loss, grads, stats, logits = _loss_and_grads(
          model, loss_fn, state.params, stats, mb, jax.random.fold_in(rng, i), scale, frozen)
      correct = jnp.argmax(logits, -1) == jnp.argmax(mb["targets"], -1)
      return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, stats), correct

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss, batch_stats), correct = jax.lax.scan(
        body, (zeros, 0.0, state.batch_stats), (micro, jnp.arange(accum_steps)))
    loss = loss / accum_steps
    scale = scale * accum_steps
  grads = jax.tree.map(lambda g: g / scale, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  if ema.enabled:
    new_state = new_state.replace(ema=ema.update(state.ema, new_state.params,
                                                 new_state.batch_stats, state.step))
  # Accuracy is only meaningful for single-label targets; the loop drops it
  # for multi-label data.
  step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                  "accuracy": jnp.mean(correct.astype(jnp.float32))}
  if scaling.enabled:
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    loss_scale, good_steps = scaling.update(state, finite)
    # Skip the update: keep the old parameters, optimizer, BatchNorm state and EMA.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = new_state.replace(step=state.step + 1, loss_scale=loss_scale,
                                  good_steps=good_steps)
    step_metrics |= {"loss_scale": loss_scale, "skipped": 1.0 - finite.astype(jnp.float32)}
  return new_state, step_metrics


def eval_step(state: TrainState, batch: dict, *, model, loss_fn: Callable,
              multilabel: bool) -> dict:
  """Sufficient statistics of one padded eval batch (see metrics.batch_stats)."""
  logits = model.apply(_variables(state.params, state.batch_stats), batch["image"], train=False)
  return metrics_lib.batch_stats(logits, batch["targets"], batch["mask"],
                                 loss_fn(logits, batch["targets"]), multilabel=multilabel)
