"""Freezing, head-only steps and per-parameter learning-rate / weight-decay multipliers."""

import functools
import os
import runpy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from test_train import assert_same_leaves  # pylint: disable=g-bad-import-order
from test_train import train_until_killed
from vit_jax_ft import base_config
from vit_jax_ft import config_ranges
from vit_jax_ft import models
from vit_jax_ft.models import resnet
from vit_jax_ft.models import vit
from vit_jax_ft.training import losses
from vit_jax_ft.training import optim
from vit_jax_ft.training import steps
from vit_jax_ft.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = 16


def _opt(**overrides):
  cfg = base_config.get_base_config().optimizer
  cfg.warmup_steps = 0
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _vit():
  return vit.VisionTransformer(num_classes=3, patch_size=4, hidden_size=16, num_layers=2,
                               num_heads=2, mlp_dim=32, head_init="lecun_normal")


def _resnet(**kwargs):
  return resnet.ResNet(num_classes=3, stage_sizes=(1, 1), block="basic", width=8,
                       head_init="lecun_normal", **kwargs)


def _abstract(model):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, IMAGE, IMAGE, 3)), train=False))


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _batch(seed=0, n=8):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n)
  images = rng.normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32) + labels[:, None, None, None]
  return {"image": jnp.asarray(images), "targets": jax.nn.one_hot(labels, 3)}


def _train(model, opt, num_steps, head_only_steps=0, total_steps=20):
  """Runs train_step as train.py does; returns (states after 0..num_steps steps, groups)."""
  abstract = _abstract(model)
  groups = optim.param_groups(opt, abstract["params"])
  sched = optim.learning_rate_schedule(opt, total_steps)
  loss_fn = losses.get_loss_fn(base_config.get_base_config().loss)
  fns = {}
  for head_only in (True, False):
    if head_only and not head_only_steps:
      continue
    bns = groups.frozen_batch_norms(abstract.get("batch_stats", {}), head_only)
    fns[head_only] = jax.jit(functools.partial(
        steps.train_step, model=model.clone(frozen_bn=bns) if bns else model,
        tx=optim.make_optimizer(opt, sched, groups, head_only=head_only), loss_fn=loss_fn,
        frozen=groups.frozen_mask(abstract["params"], head_only)))
  start = steps.create_train_state(model, optim.make_optimizer(opt, sched, groups), IMAGE, 0)
  states = [start]
  for i in range(num_steps):
    states.append(fns[i < head_only_steps](states[-1], _batch(i))[0])
  return states, groups


# ----------------------------------------------------------------------------
# Freezing.
# ----------------------------------------------------------------------------

_FREEZE = {
    "vit": (_vit, r"^embedding/,^Transformer/(posembed_input|encoderblock_0)/,cls"),
    "resnet": (_resnet, r"^conv_init/,^bn_init/,^stage1_"),
}


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_frozen_parameters_are_bit_equal_and_have_no_optimizer_state(family):
  make, pattern = _FREEZE[family]
  opt = _opt(lr=1e-2, freeze=pattern)  # AdamW with weight decay and clipping.
  (start, *_, state), groups = _train(make(), opt, num_steps=3)
  before, after = _flat(start.params), _flat(state.params)
  frozen = {p for p in before if any(p.startswith(q) for q in (
      "embedding/", "Transformer/posembed_input/", "Transformer/encoderblock_0/", "cls",
      "conv_init/", "bn_init/", "stage1_"))}
  assert groups.frozen == frozen and 0 < len(frozen) < len(before)
  for path in before:
    if path in frozen:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    else:
      assert not np.array_equal(after[path], before[path]), path
  # AdamW keeps mu and nu for each trained parameter and nothing for frozen ones.
  leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  arrays = [(optim.path_str(p), x) for p, x in leaves if np.ndim(x) > 0]
  assert sum(x.size for _, x in arrays) == 2 * sum(before[p].size for p in before
                                                    if p not in frozen)
  for name, _ in arrays:
    assert not any(name.endswith(p) for p in frozen), name


def test_frozen_batch_norm_statistics_unchanged_and_used():
  opt = _opt(lr=1e-2, freeze=_FREEZE["resnet"][1])
  (start, *_, state), groups = _train(_resnet(), opt, num_steps=3)
  frozen_bn = groups.frozen_batch_norms(start.batch_stats)
  assert frozen_bn == ("bn_init", "stage1_block1/bn1", "stage1_block1/bn2")
  before, after = _flat(start.batch_stats), _flat(state.batch_stats)
  for path in before:
    if path.rsplit("/", 1)[0] in frozen_bn:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    else:
      assert not np.array_equal(after[path], before[path]), path

  # The forward pass in training mode normalises frozen layers with their running
  # statistics: changing those changes the output; changing a trained layer's does not.
  model = _resnet(frozen_bn=frozen_bn)
  images = _batch()["image"]
  stats = jax.tree.map(lambda x: x + 0.5, state.batch_stats)  # Away from the init values.

  def train_logits(batch_stats):
    logits, _ = model.apply({"params": state.params, "batch_stats": batch_stats}, images,
                            train=True, mutable=["batch_stats"])
    return logits

  def shifted(layer):
    new = _flat(stats)
    new[f"{layer}/mean"] = new[f"{layer}/mean"] + 1.0
    return flax.traverse_util.unflatten_dict(new, sep="/")

  base = train_logits(stats)
  assert not np.allclose(train_logits(shifted("stage1_block1/bn2")), base, atol=1e-4)
  np.testing.assert_array_equal(train_logits(shifted("stage2_block1/bn1")), base)


def test_all_batch_norms_frozen_train_forward_equals_eval_forward():
  model = _resnet()
  abstract = _abstract(model)
  groups = optim.param_groups(_opt(freeze="^(?!head/)"), abstract["params"])
  bns = groups.frozen_batch_norms(abstract["batch_stats"])
  assert len(bns) == len(_flat(abstract["batch_stats"])) // 2
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, IMAGE, IMAGE, 3)), train=False)
  variables["batch_stats"] = jax.tree.map(lambda x: x + 0.3, variables["batch_stats"])
  images = _batch()["image"]
  eval_out = model.apply(variables, images, train=False)
  frozen_out, new_vars = model.clone(frozen_bn=bns).apply(variables, images, train=True,
                                                          mutable=["batch_stats"])
  np.testing.assert_array_equal(frozen_out, eval_out)
  for a, b in zip(jax.tree.leaves(new_vars), jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  train_out, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert not np.allclose(train_out, eval_out, atol=1e-3)


def test_freeze_pattern_may_name_batch_norm_layers():
  abstract = _abstract(_resnet())
  opt = _opt(freeze=r"bn1$")  # Matches layer paths only, not their parameters' paths.
  with pytest.raises(ValueError, match=r"pattern 'bn1\$' matches no parameter"):
    optim.param_groups(opt, abstract["params"])
  groups = optim.param_groups(opt, abstract["params"], abstract["batch_stats"])
  assert groups.frozen == {f"stage{s}_block1/bn1/{k}" for s in (1, 2) for k in ("scale", "bias")}
  assert groups.frozen_batch_norms(abstract["batch_stats"]) == ("stage1_block1/bn1",
                                                                 "stage2_block1/bn1")


def test_describe_logs_frozen_count_and_saved_state():
  model = _vit()
  params = _abstract(model)["params"]
  opt = _opt(freeze="^(?!head/)")
  lines = optim.describe(opt, optim.param_groups(opt, params))
  frozen = sum(x.size for p, x in _flat(params).items() if not p.startswith("head/"))
  total = sum(x.size for x in jax.tree.leaves(params))
  saved = 2 * 4 * frozen  # AdamW: mu and nu, float32.
  assert f"{frozen:,} of {total:,} parameters frozen" in lines[0]
  assert f"{saved / 2**10:.1f} KiB of adamw state saved" in lines[0]


# ----------------------------------------------------------------------------
# Per-parameter learning rates and weight decay: exact updates with plain SGD.
# ----------------------------------------------------------------------------


def _random_like(shapes, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


def _one_update(opt, params, grads, head_only=False):
  sched = optim.learning_rate_schedule(opt, 10)
  tx = optim.make_optimizer(opt, sched, optim.param_groups(opt, params), head_only=head_only)
  updates, _ = tx.update(grads, tx.init(params), params)
  return _flat(updates)


def _vit_layer_mult(path, decay):
  """ViT-2: embeddings layer 0, block i layer i + 1, the rest layer 3 (multiplier 1)."""
  if path.startswith(("embedding/", "Transformer/posembed_input/")) or path == "cls":
    return decay**3
  for i in range(2):
    if path.startswith(f"Transformer/encoderblock_{i}/"):
      return decay**(2 - i)
  return 1.0


def _resnet_layer_mult(path, decay):
  """ResNet with 2 stages: stem layer 0, stage s layer s, head layer 3."""
  if path.startswith(("conv_init/", "bn_init/")):
    return decay**3
  for s in (1, 2):
    if path.startswith(f"stage{s}_"):
      return decay**(3 - s)
  return 1.0


SGD = dict(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0,
           schedule="constant", lr=0.1)


@pytest.mark.parametrize("family,lr_mults,extra", [
    ("vit", "", {}),
    ("vit", r"head/=10,MlpBlock_3/Dense_0=3,Dense_0=100",  # First match wins.
     {"head/": 10.0, "MlpBlock_3/Dense_0": 3.0}),
    ("resnet", "", {}),
    ("resnet", r"^stage2_block1/proj=4", {"stage2_block1/proj": 4.0}),
])
def test_sgd_update_is_minus_lr_times_mult_times_grad(family, lr_mults, extra):
  make, layer_mult = {"vit": (_vit, _vit_layer_mult), "resnet": (_resnet, _resnet_layer_mult)}[
      family]
  shapes = _abstract(make())["params"]
  params, grads = _random_like(shapes, 0), _random_like(shapes, 1)
  got = _one_update(_opt(layer_decay=0.5, lr_mults=lr_mults, **SGD), params, grads)
  mults = set()
  for path, g in _flat(grads).items():
    mult = layer_mult(path, 0.5)
    mult *= next((m for k, m in extra.items() if k in path), 1.0)
    mults.add(mult)
    expected = np.float32(0.1) * (np.asarray(g) * np.float32(-mult))
    np.testing.assert_array_equal(got[path], expected, err_msg=path)
  assert len(mults) >= 4


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_wd_mults_scale_the_decay_term(name):
  # The update with decay minus the one without, per leaf, in units of -lr * wd * param:
  # lr_mult * wd_mult on kernels (decoupled AdamW decay is scaled by the group's lr too),
  # 0 elsewhere.
  shapes = _abstract(_vit())["params"]
  params, grads = _random_like(shapes, 0), _random_like(shapes, 1)
  base = dict(SGD, name=name, layer_decay=0.5, wd_mults=r"MlpBlock_3/Dense_0=3,head/=0")
  plain = _one_update(_opt(**base), params, grads)
  decayed = _one_update(_opt(**dict(base, weight_decay=0.2)), params, grads)
  for path, p in _flat(params).items():
    delta = np.asarray(decayed[path], np.float64) - plain[path]
    wd_mult = 3.0 if "MlpBlock_3/Dense_0" in path else 0.0 if path.startswith("head/") else 1.0
    ratio = _vit_layer_mult(path, 0.5) * wd_mult if path.endswith("kernel") else 0.0
    np.testing.assert_allclose(delta, -0.1 * 0.2 * ratio * np.asarray(p), rtol=1e-4, atol=1e-7,
                               err_msg=path)


def test_all_multipliers_one_is_the_plain_optimizer():
  shapes = _abstract(_vit())["params"]
  params = _random_like(shapes, 0)
  opt = _opt(lr=1e-2, lr_mults="head/=1", wd_mults="head/=1", layer_decay=1.0)
  groups = optim.param_groups(opt, params)
  assert groups.trivial and not optim.describe(opt, groups)
  sched = optim.learning_rate_schedule(opt, 10)
  tx, plain = optim.make_optimizer(opt, sched, groups), optim.make_optimizer(_opt(lr=1e-2), sched)
  s1, s2 = tx.init(params), plain.init(params)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  for i in range(3):
    grads = _random_like(shapes, 10 + i)
    (u1, s1), (u2, s2) = tx.update(grads, s1, params), plain.update(grads, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# Head-only steps.
# ----------------------------------------------------------------------------


def test_head_only_steps_train_the_head_then_everything_but_frozen():
  opt = _opt(lr=1e-2, head_only_steps=2, freeze="^embedding/")
  (start, _, phase1, phase2), groups = _train(_vit(), opt, num_steps=3, head_only_steps=2)
  p0, p1, p2 = (_flat(s.params) for s in (start, phase1, phase2))
  for path in p0:
    if path.startswith("head/"):
      assert not np.array_equal(p1[path], p0[path]), path
    else:
      np.testing.assert_array_equal(p1[path], p0[path], err_msg=path)
    if path.startswith("embedding/"):
      np.testing.assert_array_equal(p2[path], p0[path], err_msg=path)
    else:
      assert not np.array_equal(p2[path], p1[path]), path
  # Both variants share one optimizer-state structure (checkpoints resume across).
  sched = optim.learning_rate_schedule(opt, 20)
  t_head, t_full = (optim.make_optimizer(opt, sched, groups, head_only=h) for h in (True, False))
  assert (jax.tree.structure(t_head.init(start.params))
          == jax.tree.structure(t_full.init(start.params)))


def test_body_joins_with_fresh_moments_at_the_current_schedule_value():
  # After two head-only steps, a body parameter's first update is AdamW's first
  # step (bias-corrected, fresh moments) at the schedule's learning rate of step 2.
  opt = _opt(lr=1e-2, schedule="linear", grad_clip_norm=0.0, head_only_steps=2)
  shapes = _abstract(_vit())["params"]
  params = _random_like(shapes, 0)
  groups = optim.param_groups(opt, params)
  sched = optim.learning_rate_schedule(opt, 10)
  t_head, t_full = (optim.make_optimizer(opt, sched, groups, head_only=h) for h in (True, False))
  state = t_full.init(params)
  for i in range(2):
    updates, state = t_head.update(_random_like(shapes, 10 + i), state, params)
    for path, u in _flat(updates).items():
      assert path.startswith("head/") or not np.any(np.asarray(u)), path
  grads = _random_like(shapes, 20)
  got = _flat(t_full.update(grads, state, params)[0])
  fresh = optax.adamw(lambda c: sched(c + 2), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay,
                      mask=lambda t: jax.tree_util.tree_map_with_path(
                          lambda p, _: p[-1].key == "kernel", t))
  ref = _flat(fresh.update(grads, fresh.init(params), params)[0])
  for path in got:
    if not path.startswith("head/"):
      np.testing.assert_allclose(got[path], ref[path], rtol=1e-5, atol=1e-9, err_msg=path)


def test_head_only_steps_keep_every_batch_norm_statistic():
  opt = _opt(lr=1e-2, head_only_steps=2)
  (start, _, state, later), _ = _train(_resnet(), opt, num_steps=3, head_only_steps=2)
  for a, b in zip(jax.tree.leaves(start.batch_stats), jax.tree.leaves(state.batch_stats)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(later.batch_stats["bn_init"]["mean"],
                            start.batch_stats["bn_init"]["mean"])


def _demo_config(**overrides):
  config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
  config.model.hidden_size, config.model.mlp_dim = 32, 64
  config.model.num_layers, config.model.num_heads = 2, 2
  config.batch_size, config.eval_batch_size = 32, 64
  config.num_epochs, config.total_steps = None, 12
  config.optimizer.warmup_steps = 2
  config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 4, 100, 4
  config.data.test_split, config.final_report = "", False
  for key, value in overrides.items():
    config.optimizer[key] = value
  return config


def _last_checkpoint(workdir):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  return mgr.latest_step(), mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())


def test_resume_across_the_head_only_switch_is_bit_exact(tmp_path, monkeypatch):
  config = _demo_config(head_only_steps=6, layer_decay=0.8, freeze="^embedding/")
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)

  # Killed while fetching the batch of step 6 (still head-only): the checkpoint
  # of step 4 resumes, and steps 5-12 cross the switch after step 6.
  crashed = str(tmp_path / "crashed")
  train_until_killed(config, crashed, monkeypatch, 5)
  assert _last_checkpoint(crashed)[0] == 4
  train.train_and_evaluate(config, crashed)

  (step_a, a), (step_b, b) = _last_checkpoint(straight), _last_checkpoint(crashed)
  assert step_a == step_b == 12
  assert_same_leaves(a, b, ("params", "opt_state", "rng"))
  # The body trained after the switch; the frozen patch embedding never did.
  init = _flat(steps.create_train_state(
      models.create_model(config.model, 10, jnp.float32),
      optax.identity(), config.data.image_size, config.seed).params)
  got = _flat(a["params"])
  np.testing.assert_array_equal(got["embedding/kernel"], init["embedding/kernel"])
  assert not np.array_equal(got["Transformer/encoderblock_0/LayerNorm_0/scale"],
                            init["Transformer/encoderblock_0/LayerNorm_0/scale"])


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,pattern", [
    (dict(freeze="nomatch"), r"optimizer\.freeze pattern 'nomatch' matches no parameter"),
    (dict(freeze="head/,zzz"), r"pattern 'zzz' matches no parameter"),
    (dict(freeze="."), r"optimizer\.freeze='\.' freezes every parameter"),
    (dict(freeze="(head"), r"optimizer\.freeze: '\(head' is not a valid regular expression"),
    (dict(lr_mults="head/"), r"optimizer\.lr_mults: entry 'head/' must be REGEX=NUMBER"),
    (dict(lr_mults="head/=ten"), r"entry 'head/=ten' must be REGEX=NUMBER"),
    (dict(lr_mults="head/=0"), r"entry 'head/=0' needs a multiplier > 0.*optimizer\.freeze"),
    (dict(lr_mults="head/=2,nomatch=2"), r"lr_mults entry 'nomatch=2' matches no parameter"),
    (dict(wd_mults="bias=0"), r"wd_mults entry 'bias=0' matches no weight-decayed parameter"),
    (dict(wd_mults="head/=-1"), r"wd_mults: entry 'head/=-1' needs a multiplier >= 0"),
    (dict(head_only_steps=3, freeze="^head/"), r"head_only_steps=3.*freezes all of them"),
])
def test_bad_entries_fail_naming_them(overrides, pattern):
  with pytest.raises(ValueError, match=pattern) as err:
    optim.param_groups(_opt(**overrides), _abstract(_vit())["params"])
  assert "\n" not in str(err.value)


def test_layer_decay_needs_a_known_tree():
  with pytest.raises(ValueError, match="layer_decay needs a ViT or ResNet"):
    optim.param_groups(_opt(layer_decay=0.5), {"dense": {"kernel": jnp.ones(2)}})


def test_make_optimizer_without_groups_refuses_group_options():
  opt = _opt(freeze="^(?!head/)")
  with pytest.raises(ValueError, match="need the parameter tree"):
    optim.make_optimizer(opt, optim.learning_rate_schedule(opt, 10))


def test_head_only_steps_must_leave_full_training():
  with pytest.raises(ValueError, match=r"optimizer\.head_only_steps=10 must be < total_steps=10"):
    optim.validate_schedule(_opt(head_only_steps=10), 10)
  optim.validate_schedule(_opt(head_only_steps=9), 10)


@pytest.mark.parametrize("field,value,pattern", [
    ("layer_decay", 0.0, r"optimizer\.layer_decay=0\.0 must be in \(0, 1\]"),
    ("layer_decay", 1.5, r"optimizer\.layer_decay=1\.5"),
    ("head_only_steps", -1, r"optimizer\.head_only_steps=-1 must be an integer >= 0"),
])
def test_ranges(field, value, pattern):
  config = base_config.get_base_config()
  config.optimizer[field] = value
  with pytest.raises(ValueError, match=pattern):
    config_ranges.check_ranges(config)


def test_split_entries_keeps_commas_inside_regex_groups():
  assert optim.split_entries(r"a{1,3},b(c,d), [x,y]z ,\,e,") == [
      "a{1,3}", "b(c,d)", "[x,y]z", r"\,e"]


def test_frozen_parameters_get_no_gradient():
  # The train step differentiates the trained parameters only: its gradient
  # norm is the head's, computed here directly.
  model = _vit()
  opt = _opt(freeze="^(?!head/)")
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)), train=False)
  groups = optim.param_groups(opt, params["params"])
  tx = optim.make_optimizer(opt, optim.learning_rate_schedule(opt, 10), groups)
  loss_fn = losses.get_loss_fn(base_config.get_base_config().loss)
  state = steps.create_train_state(model, tx, IMAGE, 0)
  batch = _batch()
  _, metrics = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, loss_fn=loss_fn,
                                         frozen=groups.frozen_mask(state.params)))(state, batch)

  def loss(head):
    p = dict(state.params, head=head)
    return jnp.mean(loss_fn(model.apply({"params": p}, batch["image"], train=False),
                            batch["targets"]))

  head_grads = jax.grad(loss)(state.params["head"])
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(head_grads), rtol=1e-5)
