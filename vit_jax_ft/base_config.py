"""The base `ConfigDict` every experiment config starts from, with field docs.

Experiment configs (files under `configs/`) call `get_base_config()` and then
change existing fields. The returned config is locked: assigning a key that
does not exist (a typo) raises at once instead of being silently ignored, and
the train loop reads fields as attributes, never with `.get(key, default)`.
"""

from ml_collections import config_dict

from vit_jax_ft.models import bit as bit_lib
from vit_jax_ft.models import regnet as regnet_lib
from vit_jax_ft.models import convnext as convnext_lib
from vit_jax_ft.models import efficientnet as efficientnet_lib
from vit_jax_ft.models import resnet as resnet_lib
from vit_jax_ft.models import vit as vit_lib

placeholder = config_dict.placeholder

# One line per field; `tests/test_config.py` fails if a field has no entry
# here. Model fields are listed under every family's names below.
FIELD_DOCS = {
    "seed": "Random seed for initialisation, dropout and the data order.",
    "dtype": "Compute dtype: 'float32', 'bfloat16' or 'float16' (with loss scaling); params stay float32.",
    "loss_scale_init": "float16 only: initial dynamic loss scale.",
    "loss_scale_period": "float16 only: double the loss scale after this many finite steps.",
    "batch_size": "Global training batch size (split over devices and accumulation steps).",
    "eval_batch_size": "Evaluation batch size; the last partial batch is padded and masked.",
    "num_epochs": "Training length in epochs over the train split (or set total_steps).",
    "total_steps": "Training length in optimizer steps (or set num_epochs).",
    "log_every_steps": "Write averaged train metrics and print progress every N steps.",
    "eval_every_steps": "Evaluate on the validation split every N steps (and at the end).",
    "checkpoint_every_steps": "Save a checkpoint for resuming every N steps (and at the end).",
    "keep_checkpoints": "How many of the most recent checkpoints to keep.",
    "best_metric": "Validation metric that selects the kept best checkpoint, e.g. 'accuracy'.",
    "best_mode": "'max' or 'min': whether a larger or smaller best_metric is better.",
    "min_delta": "A best_metric change counts as an improvement only beyond this margin.",
    "early_stopping_patience": "Stop after this many evaluations without improvement (0: never).",
    "plateau_patience": "Multiply the learning rate by plateau_factor after this many evaluations without improvement (0: never).",
    "plateau_factor": "Learning-rate factor applied at each plateau.",
    "ema_decay": "EMA of the weights (and BatchNorm statistics) after every step, e.g. 0.9998; 0 disables (no copy kept).",
    "ema_warmup": "EMA decay min(ema_decay, (1 + t) / (10 + t)), t the steps taken before (TF ExponentialMovingAverage); False: ema_decay throughout.",
    "best_on_ema": "With EMA: select the best checkpoint (and early stopping, plateau) by val_ema_{best_metric}.",
    "eval_ema": "With EMA: the final eval, reports, predict, explain and export use the EMA weights.",
    "final_report": "After training, write the evaluation report (WORKDIR/reports) for val and test.",
    "bootstrap_resamples": "Reports: bootstrap resamples (stratified by class) for the 95% confidence intervals and `compare`'s paired differences; 0: no intervals.",
    "bootstrap_seed": "Reports: seed of the bootstrap resamples (the same seed pairs two runs' resamples).",
    "init_from": "Pretrained weights: a converted dir, .npz, HF folder or id, timm/torchvision/Keras file, TF Model Garden checkpoint (.tar.gz, folder, ckpt-N).",
    "init_strict": "Fail unless every backbone parameter loads and nothing in the checkpoint is unused.",
    "init_cache_dir": "Where raw sources are cached after conversion (default ~/.cache/vit_jax_ft).",
    "resume_with_changes": "Resume a workdir even though experiment fields (data, model, optimizer, seed, ...) differ from its config.json; the changes go to config_history.jsonl.",
    "init_model_options": "Take the model options init_from's weights were trained with (ViT GELU form and LayerNorm epsilon; ResNet variant, conv bias, BatchNorm epsilon and momentum, padding; BiT weight-standardisation epsilon; ConvNeXt head LayerNorm epsilon) over config.model's.",
    "init_head_from": "LP-FT: a workdir (a probe's or a run's) whose best checkpoint's head starts this run's head (same classes; fresh starts only).",
    "data.source": "'tfrecord' (a folder prepared by vit_jax_ft.data), 'tfds' (a prepared tensorflow-datasets dataset) or 'digits' (built-in demo).",
    "data.dir": "Folder with dataset_info.json and TFRecords. For 'digits', defaults to WORKDIR/data.",
    "data.help": "What to tell a user whose data.dir is missing (where to get the data).",
    "data.image_size": "Side of the square model input in pixels.",
    "data.train_split": "Name of the training split.",
    "data.val_split": "Name of the split used for periodic evaluation and the best checkpoint.",
    "data.test_split": "Name of the split evaluated once at the end ('' to skip).",
    "data.fold": "Cross-validation: with a dataset prepared with --folds=K, fold k in [0, K) is the val split and the other folds train (vit_jax_ft.cv sets it per fold); -1: the dataset's own train/val.",
    "data.shuffle_buffer": "Examples in the tf.data shuffle buffer.",
    "data.normalization": "Input scaling: 'auto' (what init_from's weights expect, else 'imagenet'), 'imagenet' (mean/std), 'minus_one_to_one', 'zero_one' or 'caffe_bgr' (Keras).",
    "data.crop": "Train crop: 'random_resized' (Inception-style) or 'none' (resize only).",
    "data.crop_min_scale": "Smallest area fraction of the random-resized crop.",
    "data.flip": "Random horizontal flips during training.",
    "data.dihedral": "Also random vertical flips and 90-degree rotations in training (all 8 orientations with flip): for orientation-free images such as dermoscopy; pair with evaluate --tta=dihedral.",
    "data.eval_crop_fraction": "Eval: resize to image_size / fraction, then centre-crop image_size.",
    "data.tfds_name": "source='tfds': dataset name, optionally with config and version, e.g. 'food101' or 'food101/2.0.0'.",
    "data.tfds_dir": "source='tfds': the data_dir it was prepared into (`tfds build --data_dir`); default $TFDS_DATA_DIR or ~/tensorflow_datasets. Never downloads.",
    "data.sampler": "Train sampling: 'none' (data as is), 'sqrt' (class shares ~ sqrt(count)) or 'balanced' (uniform over classes); multi-label: by each example's rarest label. Use with 'ce'/'focal', not a weighted_* loss (that would correct twice).",
    "data.randaugment_layers": "RandAugment: ops applied per image (N; TF Model Garden recipe: 2); 0 disables.",
    "data.randaugment_magnitude": "RandAugment: shared magnitude M in [0, 10] (recipe: 10); see vit_jax_ft/augment.py for each op.",
    "data.randaugment_exclude_ops": "RandAugment: comma-separated ops never chosen, e.g. 'Invert,Solarize,Posterize'.",
    "data.randaugment_cutout": "RandAugment: Cutout half side in pixels at magnitude 10 (recipe: 40).",
    "data.randaugment_translate": "RandAugment: TranslateX/Y shift in pixels at magnitude 10 (recipe: 100).",
    "data.jitter_brightness": "Colour jitter (before RandAugment): brightness factor in [1-x, 1+x]; 0 disables.",
    "data.jitter_contrast": "Colour jitter: contrast factor in [1-x, 1+x]; 0 disables.",
    "data.jitter_saturation": "Colour jitter: saturation factor in [1-x, 1+x]; 0 disables.",
    "data.jitter_hue": "Colour jitter: hue shift in [-x, x] turns (x <= 0.5); 0 disables.",
    "data.mixup_alpha": "Mixup: Beta(alpha, alpha) mixing weight per example (e.g. 0.8); 0 disables.",
    "data.cutmix_alpha": "CutMix: Beta(alpha, alpha) kept area per example (e.g. 1.0); 0 disables.",
    "data.mix_prob": "Probability that a train batch is mixed at all (Mixup/CutMix).",
    "data.mix_switch_prob": "With both enabled: probability of CutMix rather than Mixup for a batch.",
    "model.name": "Architecture: " + ", ".join(list(vit_lib.VIT_PRESETS) + ["vit"]
                                               + list(resnet_lib.RESNET_PRESETS)
                                               + list(regnet_lib.REGNET_PRESETS)
                                               + list(bit_lib.BIT_PRESETS) + ["bit"]
                                               + list(convnext_lib.CONVNEXT_PRESETS)
                                               + ["convnext"]
                                               + list(efficientnet_lib.EFFICIENTNET_PRESETS)) + ".",
    "model.patch_size": "ViT: override the preset's patch size (required for name='vit').",
    "model.hidden_size": "ViT: override the preset's width (required for name='vit').",
    "model.num_layers": "ViT: override the preset's depth (required for name='vit').",
    "model.num_heads": "ViT: override the preset's attention heads (required for name='vit').",
    "model.mlp_dim": "ViT: override the preset's MLP width (required for name='vit').",
    "model.classifier": "ViT: 'token' (class token), 'gap' (global average pool) or 'token_distilled' (DeiT distilled: class and distillation tokens, the average of two heads) head input.",
    "model.representation_size": "ViT: size of a tanh pre-logits layer (i21k weights), or None.",
    "model.gelu_approximate": "ViT: tanh GELU (vit_jax weights) instead of exact erf (HF, timm).",
    "model.layer_norm_eps": "ViT: LayerNorm epsilon (1e-6 vit_jax and timm, 1e-12 HF).",
    "model.dropout_rate": "ViT: dropout after attention and MLP.",
    "model.attention_dropout_rate": "ViT: dropout on attention weights.",
    "model.variant": "ResNet: 'v1.5' (stride on the 3x3 conv, torchvision) or 'v1' (Keras).",
    "model.conv_bias": "ResNet: biases on every convolution (Keras ResNet50).",
    "model.bn_epsilon": "ResNet, EfficientNet: BatchNorm epsilon (1e-5 torchvision and timm, 1e-3 Keras and timm's tf_efficientnet_*).",
    "model.bn_momentum": "ResNet, EfficientNet: BatchNorm running-average momentum, Flax convention (1 - torch).",
    "model.padding": "ResNet, EfficientNet: 'torch' (explicit symmetric padding) or 'tf_same' (TensorFlow 'SAME', asymmetric at stride 2: TF Model Garden weights, timm's tf_efficientnet_*).",
    "model.first_block_projection": "ResNet: a projection shortcut on the first block even where its shape stays (TF Model Garden ResNet-18/34).",
    "model.stage_sizes": "BiT: override the preset's residual units per stage, e.g. (3, 4, 6, 3) (required for name='bit').",
    "model.width_factor": "BiT: override the preset's width multiplier N of RxxxN (required for name='bit').",
    "model.ws_epsilon": "BiT: weight-standardisation epsilon (1e-10 BiT's .npz files, 1e-8 timm).",
    "model.depths": "ConvNeXt: override the preset's blocks per stage, e.g. (3, 3, 9, 3) (required for name='convnext').",
    "model.dims": "ConvNeXt: override the preset's channels per stage, e.g. (96, 192, 384, 768) (required for name='convnext').",
    "model.head_norm_eps": "ConvNeXt: epsilon of the LayerNorm before the head (1e-6 torchvision and timm; HF's layer_norm_eps, 1e-12); the others are 1e-6.",
    "model.head_init": "Classification head kernel init: 'zeros' or 'lecun_normal'.",
    "model.head_bias_init": "Initial head bias (e.g. -6.9 for sigmoid multi-label).",
    "model.remat": "Recompute blocks in the backward pass to save memory.",
    "model.drop_path_rate": "Stochastic depth (training): rate of dropping a residual branch per sample in the last block, linear from 0 at the first.",
    "model.layer_impl": "Layer implementations: 'auto' (per backend: the project's XLA:CPU-tuned convs, matmuls, BatchNorm and max-pool on CPU; plain Flax on GPU/TPU, see models/layer_impl.py), 'project' or 'flax'. Same parameters and results.",
    "optimizer.name": "'adamw', 'adam', 'sgd', 'adadelta', 'rmsprop', 'lamb' or 'lion' (optax).",
    "optimizer.schedule": "After warmup: 'cosine', 'linear' (to the floor), 'constant' (peak) or 'step' (step_decay_factor at each boundary).",
    "optimizer.lr": "Peak learning rate (reached at the end of warmup).",
    "optimizer.min_lr_ratio": "Cosine/linear decay floor as a fraction of the peak learning rate.",
    "optimizer.step_decay_factor": "schedule='step': multiply the learning rate by this (in (0, 1]) at each boundary.",
    "optimizer.step_decay_boundaries": "schedule='step': comma-separated increasing fractions in (0, 1) of the post-warmup steps.",
    "optimizer.warmup_steps": "Linear warmup steps; must be shorter than the run.",
    "optimizer.b1": "AdamW, Adam, LAMB, Lion beta1.",
    "optimizer.b2": "AdamW, Adam, LAMB, Lion beta2.",
    "optimizer.eps": "AdamW, Adam, LAMB, Adadelta, RMSprop epsilon.",
    "optimizer.momentum": "SGD momentum (0: plain SGD).",
    "optimizer.nesterov": "SGD: Nesterov momentum.",
    "optimizer.rms_decay": "RMSprop decay and Adadelta rho (average of squared gradients).",
    "optimizer.weight_decay": "Weight decay on kernels only (not biases, norms, embeddings): decoupled for adamw/lamb/lion; an L2 gradient term for adam/sgd/adadelta/rmsprop.",
    "optimizer.grad_clip_norm": "Clip gradients to this global norm (0 disables).",
    "optimizer.accum_steps": "Split each batch into this many micro-batches (same result, less memory).",
    "optimizer.freeze": "Comma-separated regexes over parameter paths (e.g. '^(?!head/)': all but the head) never trained: no update, decay or optimizer state; BatchNorm layers frozen whole run in inference mode.",
    "optimizer.head_only_steps": "Train only the head (head/) for the first N steps, then every unfrozen parameter (0: off).",
    "optimizer.layer_decay": "Per-layer lr multiplier layer_decay**(L+1-layer): ViT embeddings 0, block i i+1, head L+1; ResNet stem 0, stage s s (1: off).",
    "optimizer.lr_mults": "Per-parameter lr multipliers 'REGEX=MULT,...' over parameter paths, first match wins, e.g. 'head/=10'; times layer_decay.",
    "optimizer.wd_mults": "Per-parameter weight-decay multipliers 'REGEX=MULT,...' over the decayed kernels, first match wins (0: no decay).",
    "loss.name": "'ce', 'weighted_ce', 'focal', 'weighted_focal', 'sigmoid_bce' or 'sigmoid_focal'.",
    "loss.label_smoothing": "Label smoothing for 'ce' and 'weighted_ce'.",
    "loss.focal_gamma": "Focal loss focusing parameter gamma.",
    "loss.focal_alpha": "Focal loss alpha (None: no alpha weighting).",
    "probe.l2_grid": "vit_jax_ft.probe: comma-separated L2 strengths l2 tried (penalty l2/2 * sum(W**2) on the mean loss, over standardised features); the best on val by best_metric wins.",
    "probe.flip": "vit_jax_ft.probe: average each image's features with its mirror image's (evaluate/predict do not flip).",
    "probe.class_weight": "vit_jax_ft.probe: 'balanced' (sklearn's class_weight), 'none', or 'auto' (balanced for a weighted_* loss).",
    "probe.max_iter": "vit_jax_ft.probe: L-BFGS iteration limit per L2 value.",
    "probe.tol": "vit_jax_ft.probe: L-BFGS stops when every gradient entry is at most this.",
}


def _common_model_fields() -> dict:
  """The fields every model family has, at their defaults; each family's config ends with them."""
  return dict(
      head_init="zeros",
      head_bias_init=0.0,
      remat=False,
      drop_path_rate=0.0,
      layer_impl="auto",
  )


def vit_model_config(name: str = "vit_b16") -> config_dict.ConfigDict:
  """Model config for a ViT preset (or name='vit' with explicit sizes)."""
  if name != "vit" and name not in vit_lib.VIT_PRESETS:
    raise ValueError(f"Unknown ViT {name!r}; choose from {sorted(vit_lib.VIT_PRESETS)} or 'vit'.")
  return config_dict.ConfigDict(dict(
      name=name,
      patch_size=placeholder(int),
      hidden_size=placeholder(int),
      num_layers=placeholder(int),
      num_heads=placeholder(int),
      mlp_dim=placeholder(int),
      classifier="token_distilled" if vit_lib.is_distilled_preset(name) else "token",
      representation_size=placeholder(int),
      gelu_approximate=True,
      layer_norm_eps=1e-6,
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      **_common_model_fields(),
  ))


def resnet_model_config(name: str = "resnet50") -> config_dict.ConfigDict:
  """Model config for a ResNet preset (torchvision-style v1.5 by default)."""
  if name not in resnet_lib.RESNET_PRESETS:
    raise ValueError(f"Unknown ResNet {name!r}; choose from {sorted(resnet_lib.RESNET_PRESETS)}.")
  return config_dict.ConfigDict(dict(
      name=name,
      variant="v1.5",
      conv_bias=False,
      bn_epsilon=1e-5,
      bn_momentum=0.9,
      padding="torch",
      first_block_projection=False,
      **_common_model_fields(),
  ))


def bit_model_config(name: str = "bit_r50x1") -> config_dict.ConfigDict:
  """Model config for a BiT ResNet v2 preset (or name='bit' with explicit sizes)."""
  if name != "bit" and name not in bit_lib.BIT_PRESETS:
    raise ValueError(f"Unknown BiT {name!r}; choose from {sorted(bit_lib.BIT_PRESETS)} or 'bit'.")
  return config_dict.ConfigDict(dict(
      name=name,
      stage_sizes=placeholder(tuple),
      width_factor=placeholder(int),
      ws_epsilon=1e-10,
      **_common_model_fields(),
  ))


def regnet_model_config(name: str = "regnety_400mf") -> config_dict.ConfigDict:
  """Model config for a RegNet preset: the ResNet config's fields that a RegNet has.

  (A ResNet config with model.name set to a RegNet works too, its ResNet-only
  fields at their defaults.)
  """
  if name not in regnet_lib.REGNET_PRESETS:
    raise ValueError(f"Unknown RegNet {name!r}; choose from {sorted(regnet_lib.REGNET_PRESETS)}.")
  return config_dict.ConfigDict(dict(
      name=name,
      bn_epsilon=1e-5,
      bn_momentum=0.9,
      **_common_model_fields(),
  ))


def convnext_model_config(name: str = "convnext_tiny") -> config_dict.ConfigDict:
  """Model config for a ConvNeXt preset (or name='convnext' with explicit sizes)."""
  if name != "convnext" and name not in convnext_lib.CONVNEXT_PRESETS:
    raise ValueError(f"Unknown ConvNeXt {name!r}; choose from "
                     f"{sorted(convnext_lib.CONVNEXT_PRESETS)} or 'convnext'.")
  return config_dict.ConfigDict(dict(
      name=name,
      depths=placeholder(tuple),
      dims=placeholder(tuple),
      head_norm_eps=1e-6,
      **_common_model_fields(),
  ))


def efficientnet_model_config(name: str = "efficientnet_b0") -> config_dict.ConfigDict:
  """Model config for an EfficientNet preset (native weights' options; TF ports set theirs)."""
  if name not in efficientnet_lib.EFFICIENTNET_PRESETS:
    raise ValueError(f"Unknown EfficientNet {name!r}; choose from "
                     f"{sorted(efficientnet_lib.EFFICIENTNET_PRESETS)}.")
  return config_dict.ConfigDict(dict(
      name=name,
      bn_epsilon=1e-5,
      bn_momentum=0.9,
      padding="torch",
      **_common_model_fields(),
  ))


def model_config(name: str) -> config_dict.ConfigDict:
  """The model config of any `model.name`, from its family's *_model_config.

  Raises:
    ValueError: for an unknown name; the message lists every valid one.
  """
  families = ((vit_model_config, list(vit_lib.VIT_PRESETS) + ["vit"]),
              (resnet_model_config, list(resnet_lib.RESNET_PRESETS)),
              (regnet_model_config, list(regnet_lib.REGNET_PRESETS)),
              (bit_model_config, list(bit_lib.BIT_PRESETS) + ["bit"]),
              (convnext_model_config, list(convnext_lib.CONVNEXT_PRESETS) + ["convnext"]),
              (efficientnet_model_config, list(efficientnet_lib.EFFICIENTNET_PRESETS)))
  for make, names in families:
    if name in names:
      return make(name)
  valid = [n for _, names in families for n in names]
  raise ValueError(f"Unknown model.name {name!r}; valid names: {', '.join(valid)}.")


def resnet_small_data(config: config_dict.ConfigDict,
                      name: str = "resnet50") -> config_dict.ConfigDict:
  """Turns an experiment config into the ResNet small-data recipe, in place.

  The controls that beat a linear probe on ISIC (README: 'Linear probe and
  LP-FT'): the stem and stages 1-2 frozen with every BatchNorm in inference
  mode (batch 16 is too small for batch statistics, and the low stages hold
  generic edges and textures, so 2.6x fewer weights train and a step costs
  about half), 150 head-only steps at 10x lr before the body joins (LP-FT in
  one run), layer-wise lr decay 0.7 and an EMA of the weights.
  """
  config.model = resnet_model_config(name)
  config.optimizer.freeze = "bn,^conv_init/,^stage1_,^stage2_"
  config.optimizer.head_only_steps = 150
  config.optimizer.lr_mults = "head/=10"
  config.optimizer.layer_decay = 0.7
  config.ema_decay = 0.998
  return config


def get_base_config() -> config_dict.ConfigDict:
  """Defaults shared by all experiments; see FIELD_DOCS for each field."""
  c = config_dict.ConfigDict()
  c.seed = 0
  c.dtype = "float32"
  c.loss_scale_init = 2.0**15
  c.loss_scale_period = 2000
  c.batch_size = 16
  c.eval_batch_size = 64
  c.num_epochs = placeholder(float)
  c.total_steps = placeholder(int)
  c.log_every_steps = 10
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 2
  c.best_metric = "accuracy"
  c.best_mode = "max"
  c.min_delta = 0.0
  c.early_stopping_patience = 0
  c.plateau_patience = 0
  c.plateau_factor = 0.5
  c.ema_decay = 0.0
  c.ema_warmup = True
  c.best_on_ema = True
  c.eval_ema = True
  c.final_report = True
  c.bootstrap_resamples = 1000
  c.bootstrap_seed = 0
  c.init_from = placeholder(str)
  c.init_strict = True
  c.init_cache_dir = placeholder(str)
  c.init_model_options = True
  c.resume_with_changes = False
  c.init_head_from = placeholder(str)

  c.data = config_dict.ConfigDict(dict(
      source="tfrecord",
      dir=placeholder(str),
      help="",
      image_size=224,
      train_split="train",
      val_split="val",
      test_split="test",
      fold=-1,
      shuffle_buffer=2048,
      normalization="auto",
      crop="random_resized",
      crop_min_scale=0.08,
      flip=True,
      dihedral=False,
      eval_crop_fraction=0.875,
      tfds_name=placeholder(str),
      tfds_dir=placeholder(str),
      sampler="none",
      randaugment_layers=0,
      randaugment_magnitude=10.0,
      randaugment_exclude_ops="",
      randaugment_cutout=40,
      randaugment_translate=100,
      jitter_brightness=0.0,
      jitter_contrast=0.0,
      jitter_saturation=0.0,
      jitter_hue=0.0,
      mixup_alpha=0.0,
      cutmix_alpha=0.0,
      mix_prob=1.0,
      mix_switch_prob=0.5,
  ))
  c.model = vit_model_config("vit_b16")
  c.optimizer = config_dict.ConfigDict(dict(
      name="adamw",
      schedule="cosine",
      lr=1e-4,
      min_lr_ratio=0.0,
      step_decay_factor=0.1,
      step_decay_boundaries="0.5,0.75",
      warmup_steps=0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      momentum=0.9,
      nesterov=False,
      rms_decay=0.9,
      weight_decay=0.05,
      grad_clip_norm=1.0,
      accum_steps=1,
      freeze="",
      head_only_steps=0,
      layer_decay=1.0,
      lr_mults="",
      wd_mults="",
  ))
  c.loss = config_dict.ConfigDict(dict(
      name="ce",
      label_smoothing=0.0,
      focal_gamma=2.0,
      focal_alpha=placeholder(float),
  ))
  c.probe = config_dict.ConfigDict(dict(
      l2_grid="1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1",
      flip=False,
      class_weight="auto",
      max_iter=1000,
      tol=1e-5,
  ))
  c.lock()
  return c


def flatten_keys(config: config_dict.ConfigDict, prefix: str = "") -> list[str]:
  """All leaf keys of a config as dotted paths, e.g. 'optimizer.lr'."""
  keys = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, config_dict.ConfigDict):
      keys.extend(flatten_keys(value, path + "."))
    else:
      keys.append(path)
  return keys


def reference_table() -> str:
  """Markdown table of every config field: default and meaning.

  Model fields are listed for every family (ViT defaults from
  vit_model_config(), ResNet ones from resnet_model_config(), BiT-only ones
  from bit_model_config(), ConvNeXt-only ones from convnext_model_config()). The README
  embeds this table; tests/test_config.py keeps the two in sync.
  """
  rows = []
  defaults = {}
  for config in (get_base_config(), config_dict.ConfigDict({"model": resnet_model_config()}),
                 config_dict.ConfigDict({"model": bit_model_config()}),
                 config_dict.ConfigDict({"model": convnext_model_config()})):
    for key in flatten_keys(config):
      node = config
      for part in key.split("."):
        node = node[part]
      defaults.setdefault(key, node)
  for key, doc in FIELD_DOCS.items():
    rows.append(f"| `{key}` | `{defaults[key]!r}` | {doc} |")
  return "\n".join(["| field | default | meaning |", "| --- | --- | --- |"] + rows)


if __name__ == "__main__":
  print(reference_table())  # python -m vit_jax_ft.base_config > table for the README
