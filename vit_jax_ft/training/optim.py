"""Learning-rate schedules and the optimizers (all from optax).

The schedule is checked at start-up: a run whose learning rate would stay at
(or never leave) zero is a configuration error, not something to discover
after a day of training.
"""

import dataclasses
import math
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant", "step")
OPTIMIZERS = ("adamw", "adam", "sgd", "adadelta", "rmsprop", "lamb", "lion")


def step_boundaries(opt: ml_collections.ConfigDict) -> list[float]:
  """`optimizer.step_decay_boundaries` as a list of fractions of the decay phase."""
  text = opt.step_decay_boundaries
  try:
    return [float(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"optimizer.step_decay_boundaries={text!r} must be comma-separated "
                     "numbers, e.g. '0.5,0.75'.") from None


def _validate_step(opt: ml_collections.ConfigDict) -> None:
  if not 0.0 < opt.step_decay_factor <= 1.0:
    raise ValueError(f"optimizer.step_decay_factor={opt.step_decay_factor} must be in (0, 1]: "
                     "the learning rate would reach zero (or grow).")
  bounds = step_boundaries(opt)
  if not bounds or any(not 0.0 < b < 1.0 for b in bounds) or bounds != sorted(set(bounds)):
    raise ValueError(f"optimizer.step_decay_boundaries={opt.step_decay_boundaries!r} must be "
                     "strictly increasing fractions in (0, 1), e.g. '0.5,0.75'.")
  # Many tiny factors can underflow float32 to zero: that is a zero learning rate too.
  if not jnp.float32(opt.lr) * jnp.float32(opt.step_decay_factor)**len(bounds) > 0:
    raise ValueError(f"optimizer.step_decay_factor={opt.step_decay_factor} over "
                     f"{len(bounds)} boundaries makes the learning rate zero in float32.")


def validate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> None:
  """Rejects schedules that would leave the learning rate at zero or never at peak."""
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r} is unknown; choose from "
                     f"{', '.join(SCHEDULES)}.")
  if total_steps <= 0:
    raise ValueError(f"The run has {total_steps} training steps; set num_epochs or "
                     "total_steps so that at least one step is taken (is the train split "
                     "smaller than batch_size?).")
  if not opt.lr > 0:
    raise ValueError(f"optimizer.lr={opt.lr} must be > 0: the model would never change.")
  if opt.warmup_steps < 0 or opt.warmup_steps >= total_steps:
    raise ValueError(
        f"optimizer.warmup_steps={opt.warmup_steps} must be in [0, total_steps={total_steps}): "
        "the learning rate would never reach its peak or decay.")
  if not 0.0 <= opt.min_lr_ratio <= 1.0:
    raise ValueError(f"optimizer.min_lr_ratio={opt.min_lr_ratio} must be within [0, 1].")
  if opt.schedule == "step":
    _validate_step(opt)
  if opt.head_only_steps >= total_steps:
    raise ValueError(
        f"optimizer.head_only_steps={opt.head_only_steps} must be < total_steps={total_steps}: "
        "the body would never train (to train only the head, set "
        "optimizer.freeze='^(?!head/)').")


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then `opt.schedule` decay.

  Step 0 already trains: the warmup gives lr * (step + 1) / warmup_steps,
  reaching the peak at step warmup_steps - 1. The decay starts at the peak at
  step warmup_steps. 'cosine' and 'linear' would reach the floor
  lr * min_lr_ratio at step total_steps, one past the last step, so no step
  is spent at a zero learning rate. 'constant' stays at the peak; 'step'
  multiplies it by step_decay_factor at each boundary fraction of the decay
  phase (no floor: the factors set the end value).
  """
  validate_schedule(opt, total_steps)
  peak, floor = opt.lr, opt.lr * opt.min_lr_ratio
  warmup = opt.warmup_steps
  decay_steps = total_steps - warmup
  bounds = step_boundaries(opt) if opt.schedule == "step" else []

  def decay(progress):
    if opt.schedule == "cosine":
      return floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    if opt.schedule == "linear":
      return floor + (peak - floor) * (1.0 - progress)
    if opt.schedule == "constant":
      return jnp.full_like(progress, peak)
    passed = sum((progress >= b).astype(jnp.float32) for b in bounds)
    return peak * opt.step_decay_factor**passed

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    return jnp.where(step < warmup, warm, decay(progress))

  return schedule


def on_host(schedule: optax.Schedule):
  """`schedule` as a step -> float function evaluated on the host CPU.

  The train loop logs the learning rate every step; evaluated on the default
  device, `float(schedule(step))` would queue behind the (asynchronously
  dispatched) train step on a GPU and wait for it.
  """
  cpu = jax.local_devices(backend="cpu")[0]  # This process's own: others' are not addressable.

  def value(step: int) -> float:
    with jax.default_device(cpu):
      return float(schedule(step))

  return value


def _decay_mask(params):
  # Weight decay on Dense/Conv kernels only: not on biases (attention biases
  # are 2-D, so a rank rule would catch them), norm scales, position
  # embeddings or the class token (as timm and big_vision).
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def _base_optimizer(opt: ml_collections.ConfigDict, schedule: optax.ScalarOrSchedule,
                    weight_decay: Optional[float] = None):
  """The optimizer named by `opt.name`, with the kernel-only weight decay.

  `weight_decay` overrides `opt.weight_decay` (a parameter group's wd_mults).
  """
  wd = opt.weight_decay if weight_decay is None else weight_decay
  # These take decoupled weight decay (scaled by the learning rate) themselves.
  decoupled = {
      "adamw": lambda: optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                   weight_decay=wd, mask=_decay_mask),
      "lamb": lambda: optax.lamb(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                 weight_decay=wd, mask=_decay_mask),
      "lion": lambda: optax.lion(schedule, b1=opt.b1, b2=opt.b2,
                                 weight_decay=wd, mask=_decay_mask),
  }
  # These get weight decay as an L2 term added to the gradient before the
  # optimizer (as torch's weight_decay for Adam, SGD, RMSprop, Adadelta).
  coupled = {
      "adam": lambda: optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps),
      "sgd": lambda: optax.sgd(schedule, momentum=opt.momentum or None,
                               nesterov=opt.nesterov),
      "adadelta": lambda: optax.adadelta(schedule, rho=opt.rms_decay, eps=opt.eps),
      "rmsprop": lambda: optax.rmsprop(schedule, decay=opt.rms_decay, eps=opt.eps),
  }
  if opt.name in decoupled:
    return decoupled[opt.name]()
  if opt.name in coupled:
    if wd > 0:
      return optax.chain(optax.add_decayed_weights(wd, _decay_mask), coupled[opt.name]())
    return coupled[opt.name]()
  raise ValueError(f"optimizer.name={opt.name!r} is unknown; choose from {', '.join(OPTIMIZERS)}.")


def make_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule,
                   groups: Optional["ParamGroups"] = None, *, head_only: bool = False):
  """The optimizer `opt.name` (default AdamW) with optional global-norm clipping.

  `groups` (from `param_groups`) adds freezing and per-parameter learning-rate
  and weight-decay multipliers; `head_only=True` gives the optimizer of the
  first `head_only_steps` steps, whose state has the same structure. Without
  any of those options the optimizer is exactly the plain one.
  """
  if groups is None and _uses_groups(opt):
    raise ValueError("optimizer.freeze/head_only_steps/layer_decay/lr_mults/wd_mults need the "
                     "parameter tree: pass groups=optim.param_groups(opt, params).")
  if groups is not None and not groups.trivial:
    return _grouped_optimizer(opt, schedule, groups, head_only)
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(_base_optimizer(opt, schedule))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------
# Parameter groups: freezing, head-only steps, per-layer learning rates.
# ----------------------------------------------------------------------------

HEAD_PREFIX = "head/"
# DeiT's distillation head is a head too (trained in head_only_steps, top layer).
HEAD_PREFIXES = (HEAD_PREFIX, "head_dist/")
_VIT_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
_RESNET_STAGE = re.compile(r"^stage(\d+)_block\d+/")


def path_str(path) -> str:
  """A tree path as '/'-joined keys, e.g. 'Transformer/encoderblock_0/LayerNorm_0/scale'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_paths(tree) -> list[str]:
  """The '/'-joined paths of the leaves of `tree`, in leaf order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def split_entries(text: str) -> list[str]:
  """Splits on commas outside (), [] and {} (so 'a{1,3}' stays one regex); drops empty ones."""
  entries, current, depth, escaped = [], [], 0, False
  for ch in text:
    if escaped:
      escaped = False
    elif ch == "\\":
      escaped = True
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth = max(depth - 1, 0)
    elif ch == "," and depth == 0:
      entries.append("".join(current))
      current = []
      continue
    current.append(ch)
  entries.append("".join(current))
  return [e.strip() for e in entries if e.strip()]


def _compile(field: str, pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"optimizer.{field}: {pattern!r} is not a valid regular expression "
                     f"({e}).") from None


def parse_freeze(text: str) -> list[tuple[str, re.Pattern]]:
  """`optimizer.freeze`: comma-separated regexes, as (text, compiled) pairs."""
  return [(entry, _compile("freeze", entry)) for entry in split_entries(text)]


def parse_mults(field: str, text: str) -> list[tuple[str, re.Pattern, float]]:
  """`optimizer.lr_mults` / `wd_mults`: 'REGEX=MULT,...' as (entry, regex, multiplier)."""
  rules = []
  for entry in split_entries(text):
    pattern, sep, value = entry.rpartition("=")
    try:
      mult = float(value)
    except ValueError:
      mult = math.nan
    if not sep or not pattern.strip() or not math.isfinite(mult):
      raise ValueError(f"optimizer.{field}: entry {entry!r} must be REGEX=NUMBER, "
                       "e.g. 'head/=10,^embedding/=0.1'.")
    if field == "lr_mults" and not mult > 0:
      raise ValueError(f"optimizer.lr_mults: entry {entry!r} needs a multiplier > 0; to leave "
                       "parameters unchanged use optimizer.freeze (no optimizer state).")
    if mult < 0:
      raise ValueError(f"optimizer.{field}: entry {entry!r} needs a multiplier >= 0.")
    rules.append((entry, _compile(field, pattern.strip()), mult))
  return rules


def layer_ids(paths: list[str]) -> tuple[dict[str, int], int]:
  """Each parameter's layer for optimizer.layer_decay, and the top layer L + 1.

  ViT: patch embedding, class (and DeiT distillation) token and position embedding are layer 0,
  encoder block i is i + 1, the final norm, pre-logits and head L + 1.
  ResNet, BiT and ConvNeXt: the stem (conv_init, bn_init / norm_init) is 0,
  stage s is s (ConvNeXt's downsampling opens its stage's first block), the
  norm_pre_head of BiT and ConvNeXt and the head L + 1 (L stages).
  """
  if any(p.startswith("Transformer/") for p in paths):  # ViT: block i is layer i + 1.
    scan, offset = _VIT_BLOCK, 1
    bottom = ("embedding/", "Transformer/posembed_input/")
    upper = ("Transformer/encoder_norm/", "pre_logits/") + HEAD_PREFIXES
  elif any(p.startswith("conv_init/") for p in paths):  # ResNet: stage s is layer s.
    scan, offset = _RESNET_STAGE, 0
    # BiT's pre-activation ResNet has a GroupNorm before the head (norm_pre_head).
    # ConvNeXt's stem ends in a LayerNorm (norm_init); its last one is norm_pre_head too.
    # EfficientNet's 1x1 conv_head/bn_head after the last stage belong with the head.
    bottom = ("conv_init/", "bn_init/", "norm_init/")
    upper = ("norm_pre_head/", "conv_head/", "bn_head/", HEAD_PREFIX)
  else:
    raise ValueError("optimizer.layer_decay needs a ViT or ResNet parameter tree; found "
                     f"neither ({', '.join(paths[:3])}, ...).")
  top = max((int(m.group(1)) + offset for m in map(scan.match, paths) if m), default=0) + 1
  ids = {}
  for p in paths:
    m = scan.match(p)
    if m:
      ids[p] = int(m.group(1)) + offset
    elif p in ("cls", "dist") or p.startswith(bottom):
      ids[p] = 0
    elif p.startswith(upper):
      ids[p] = top
    else:
      raise ValueError(f"optimizer.layer_decay: no layer is known for parameter {p!r}.")
  return ids, top


@dataclasses.dataclass(frozen=True)
class ParamGroups:
  """What the optimizer does with each parameter, by path; built by `param_groups`."""

  shapes: dict[str, jax.ShapeDtypeStruct]  # Every parameter, in leaf order.
  frozen: frozenset[str]  # optimizer.freeze: never trained.
  head: frozenset[str]  # The only ones trained during the first head_only_steps.
  lr_mult: dict[str, float]
  wd_mult: dict[str, float]  # 1 for parameters without weight decay.
  head_only_steps: int

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(self.shapes)

  @property
  def trivial(self) -> bool:
    """True when the plain optimizer does the same: nothing frozen, every multiplier 1."""
    return (not self.frozen and not self.head_only_steps
            and all(v == 1.0 for v in self.lr_mult.values())
            and all(v == 1.0 for v in self.wd_mult.values()))

  def frozen_paths(self, head_only: bool = False) -> frozenset[str]:
    """Parameters without updates: `freeze`, and during head-only steps all but the head."""
    return self.frozen | (frozenset(self.shapes) - self.head) if head_only else self.frozen

  def frozen_mask(self, tree: Any, head_only: bool = False) -> Any:
    """Bools like `tree` (True: frozen) for steps.train_step, or None when none is frozen."""
    frozen = self.frozen_paths(head_only)
    if not frozen:
      return None
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p) in frozen, tree)

  def frozen_batch_norms(self, batch_stats: Any, head_only: bool = False) -> tuple[str, ...]:
    """BatchNorm layers (module paths) whose parameters are all frozen.

    They must run in inference mode: normalising with the batch's statistics
    while their scale and bias cannot adapt would shift every activation
    after them (what Keras learned with BatchNormalization(trainable=False)).
    """
    frozen = self.frozen_paths(head_only)
    layers = sorted({p.rsplit("/", 1)[0] for p in param_paths(batch_stats)})
    out = []
    for layer in layers:
      own = [p for p in self.shapes if p.startswith(layer + "/")]
      if own and all(p in frozen for p in own):
        out.append(layer)
    return tuple(out)

  def labels(self) -> tuple[dict[str, str], dict[str, tuple[bool, float, float]]]:
    """(path -> group name, group name -> (head group, lr_mult, wd_mult)); 'frozen' too."""
    split_head = self.head_only_steps > 0
    keys = {p: (split_head and p in self.head, self.lr_mult[p], self.wd_mult[p])
            for p in self.shapes if p not in self.frozen}
    names = {k: f"group{i}" for i, k in enumerate(sorted(set(keys.values())))}
    labels = {p: names[keys[p]] if p in keys else "frozen" for p in self.shapes}
    return labels, {name: key for key, name in names.items()}


def _uses_groups(opt: ml_collections.ConfigDict) -> bool:
  return bool(split_entries(opt.freeze) or opt.head_only_steps or opt.layer_decay != 1.0
              or split_entries(opt.lr_mults) or split_entries(opt.wd_mults))


def _is_decayed(path: str) -> bool:
  return path.rsplit("/", 1)[-1] == "kernel"  # As _decay_mask.


def param_groups(opt: ml_collections.ConfigDict, params: Any,
                 batch_stats: Any = None) -> ParamGroups:
  """Resolves freeze, head_only_steps, layer_decay, lr_mults and wd_mults over `params`.

  `params` may be abstract (jax.eval_shape). A freeze pattern that matches a
  BatchNorm layer's path in `batch_stats` (e.g. 'bn1$') freezes its
  parameters too. A pattern or entry that matches nothing, or settings that
  leave nothing to train, raise ValueError.
  """
  shapes = {path_str(p): jax.ShapeDtypeStruct(x.shape, x.dtype)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  paths = list(shapes)
  examples = ", ".join(repr(p) for p in paths if p.startswith(HEAD_PREFIX)) or repr(paths[0])
  bn_layers = sorted({p.rsplit("/", 1)[0] for p in param_paths(batch_stats or {})})
  frozen = set()
  for entry, regex in parse_freeze(opt.freeze):
    hits = {p for p in paths if regex.search(p)}
    for layer in filter(regex.search, bn_layers):
      hits |= {p for p in paths if p.startswith(layer + "/")}
    if not hits:
      raise ValueError(f"optimizer.freeze pattern {entry!r} matches no parameter (paths look "
                       f"like {examples}).")
    frozen |= hits
  if len(frozen) == len(paths):
    raise ValueError(f"optimizer.freeze={opt.freeze!r} freezes every parameter; nothing "
                     "would train.")
  head = {p for p in paths if p.startswith(HEAD_PREFIXES)}
  if opt.head_only_steps > 0 and not head - frozen:
    raise ValueError(
        f"optimizer.head_only_steps={opt.head_only_steps} first trains only the 'head/' "
        "parameters, but " + (f"optimizer.freeze={opt.freeze!r} freezes all of them."
                              if head else "the model has none."))
  lr_mult = dict.fromkeys(paths, 1.0)
  if opt.layer_decay != 1.0:
    ids, top = layer_ids(paths)
    lr_mult = {p: opt.layer_decay**(top - ids[p]) for p in paths}
  wd_mult = dict.fromkeys(paths, 1.0)
  for field, mults, candidates in (("lr_mults", lr_mult, paths),
                                   ("wd_mults", wd_mult, [p for p in paths if _is_decayed(p)])):
    rules = parse_mults(field, opt[field])
    for entry, regex, _ in rules:
      if not any(regex.search(p) for p in candidates):
        what = "parameter" if field == "lr_mults" else "weight-decayed parameter (kernels)"
        raise ValueError(f"optimizer.{field} entry {entry!r} matches no {what} (paths look "
                         f"like {examples}).")
    for p in candidates:
      mult = next((m for _, regex, m in rules if regex.search(p)), 1.0)  # First match wins.
      mults[p] *= mult
  return ParamGroups(shapes=shapes, frozen=frozenset(frozen), head=frozenset(head),
                     lr_mult=lr_mult, wd_mult=wd_mult, head_only_steps=opt.head_only_steps)


def _hold(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` paused: zero updates and its state unchanged (waiting out head_only_steps)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(jnp.zeros_like, updates), state

  return optax.GradientTransformation(inner.init, update)


def _by_path(values: dict) -> Any:
  """A function mapping a tree to the tree of `values[path]` (optax label/mask callables)."""
  return lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: values[path_str(p)], tree)


def _grouped_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule,
                       groups: ParamGroups, head_only: bool) -> optax.GradientTransformation:
  """Frozen gradients zeroed, clipping, one optimizer per group, then the schedule.

  Each group's optimizer runs at learning rate lr_mult with weight decay
  wd * wd_mult (still decoupled, so scaled by the learning rate, for
  adamw/lamb/lion); the shared schedule multiplies every update last and
  counts global steps. Frozen parameters have no optimizer state. The
  head-only variant pauses the non-head groups in the same state structure:
  they join at the schedule's current value with fresh moments.
  """
  if head_only and not groups.head_only_steps:
    raise ValueError("head_only=True needs optimizer.head_only_steps > 0.")
  labels, keys = groups.labels()
  transforms = {}
  for name, (is_head, lr_mult, wd_mult) in keys.items():
    tx = _base_optimizer(opt, lr_mult, opt.weight_decay * wd_mult)
    transforms[name] = _hold(tx) if head_only and not is_head else tx
  if groups.frozen:
    transforms["frozen"] = optax.set_to_zero()
  frozen_now = groups.frozen_paths(head_only)
  # Zeroed first so that frozen gradients take no share of the clipping norm.
  parts = [optax.masked(optax.set_to_zero(), _by_path({p: p in frozen_now for p in labels}))]
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts += [optax.multi_transform(transforms, _by_path(labels)),
            optax.scale_by_schedule(schedule)]
  return optax.chain(*parts)


def _state_bytes(tx: optax.GradientTransformation, shapes: dict) -> int:
  state = jax.eval_shape(tx.init, shapes)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _fmt_bytes(n: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} bytes"


def _units(paths: list[str], limit: int = 6) -> str:
  """Short names of the modules in `paths`: 'Transformer/encoderblock_3', 'head', ..."""
  units = []
  for p in paths:
    parts = p.split("/")
    unit = "/".join(parts[:2]) if parts[0] == "Transformer" and len(parts) > 2 else parts[0]
    if unit not in units:
      units.append(unit)
  more = f", ... ({len(units) - limit} more)" if len(units) > limit else ""
  return ", ".join(units[:limit]) + more


def describe(opt: ml_collections.ConfigDict, groups: ParamGroups,
             batch_stats: Any = None) -> list[str]:
  """Log lines: what is frozen, the head-only phase, the multipliers by group."""
  if groups.trivial:
    return []
  size = lambda paths: sum(groups.shapes[p].size for p in paths)
  lines = []
  if groups.frozen:
    frozen = [p for p in groups.paths if p in groups.frozen]
    base = _base_optimizer(opt, 1.0)
    saved = (_state_bytes(base, {p: groups.shapes[p] for p in frozen})
             - _state_bytes(base, {}))
    lines.append(f"optimizer.freeze={opt.freeze!r}: {size(frozen):,} of "
                 f"{size(groups.paths):,} parameters frozen ({len(frozen)} tensors: "
                 f"{_units(frozen)}); {_fmt_bytes(saved)} of {opt.name} state saved.")
  for head_only in (True, False) if groups.head_only_steps else (False,):
    bns = groups.frozen_batch_norms(batch_stats or {}, head_only)
    if bns:
      phase = f"steps 1-{groups.head_only_steps}" if head_only else "training"
      lines.append(f"{len(bns)} BatchNorm layers frozen during {phase} (inference mode: "
                   f"running statistics used, not updated): {_units(list(bns))}.")
  if groups.head_only_steps:
    trained = [p for p in groups.head if p not in groups.frozen]
    lines.append(f"optimizer.head_only_steps={groups.head_only_steps}: steps 1-"
                 f"{groups.head_only_steps} train only the head ({size(trained):,} "
                 "parameters), then every unfrozen parameter.")
  mults = {}
  for p in groups.paths:
    if p not in groups.frozen:
      mults.setdefault((groups.lr_mult[p], groups.wd_mult[p]), []).append(p)
  if len(mults) > 1 or (1.0, 1.0) not in mults:
    lines.append("Learning-rate (lr) and weight-decay (wd) multipliers by group:")
    for (lr, wd), paths in sorted(mults.items(), key=lambda kv: -kv[0][0]):
      lines.append(f"  lr x{lr:.4g}, wd x{wd:.4g}: {_units(paths)} ({len(paths)} tensors, "
                   f"{size(paths):,} parameters)")
  return lines
