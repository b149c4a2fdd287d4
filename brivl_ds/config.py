"""Typed configuration: every default lives here, presets are functions that return a Config.

Any field can be overridden from the command line with `--set section.field=value`
(for example `--set model.image.backbone=resnet18 --set optim.lr=3e-4`).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

CHINESE_ROBERTA_VOCAB = 21128
"""Vocabulary of hfl/chinese-roberta-wwm-ext(-large): what models are counted, planned and built with when no
tokenizer is loaded (the presets and plan commands, the construction benchmark)."""
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
"""File suffixes read as images where a folder of images is the input (embed --images, zero-shot ImageFolder)."""


@dataclass
class ImageTowerConfig:
    backbone: str = "convnext_atto"
    """timm model name; the feature map of its last stage (`forward_features`) is pooled per box. A ViT/EVA's
    patch tokens (prefix and register tokens dropped) are laid out on the patch grid as that feature map."""
    pretrained_path: str | None = None
    """Local timm checkpoint file for the backbone; None = random init. Nothing is fetched from a hub."""
    image_size: int = 96
    """Square network input size in pixels (the official dataset resizes without keeping the aspect ratio)."""
    max_boxes: int = 36
    """Detector boxes kept per image; the whole-image box is appended, so sequences are max_boxes + 1 long."""
    roi_output_size: int = 1
    """RoIAlign output grid per box (r x r cells, flattened before the box projection)."""
    width: int = 128
    """Width of the box self-attention block."""
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    box_position_embedding: bool = True
    """Add a learned embedding of each box's normalised coordinates to its token."""
    trainable_backbone_groups: int = -1
    """Train only the top N parameter groups of the backbone (timm's coarse group_matcher: stem, stages...);
    -1 trains all. The official code trains only the top CNN blocks."""
    frozen_bn_stats: bool = True
    """Normalise with the BatchNorm running statistics, never batch statistics, and never update them (the affine
    parameters still train). Every image's embedding is then independent of the rest of its batch, so the
    momentum keys cannot leak the positive through batch statistics (MoCo's reason for shuffle-BN) and no
    cross-rank shuffle is needed. The statistics stay fp32 in bf16 runs (brivl_ds/models/batchnorm.py). False
    (train-mode BN with batch statistics) runs in fp32 only."""
    backbone_depth: int | None = None
    """ViT backbones: the number of transformer blocks (None = the named model's); for depth-reduced rehearsals of
    a preset at its real widths."""
    qk_norm: bool = False
    """ViT backbones: LayerNorm on queries and keys per head (ViT-22B's fix for attention-logit divergence of
    large ViTs)."""
    layer_scale: float | None = None
    """ViT backbones: LayerScale on each residual branch, initialised to this value (CaiT, EVA); None = off."""
    grad_checkpointing: bool = False
    """Activation checkpointing of the online tower: the CNN's stages (timm's set_grad_checkpointing) and each box
    self-attention layer keep only their inputs and are recomputed in the backward (non-reentrant)."""


@dataclass
class TextTowerConfig:
    pretrained_path: str | None = None
    """Local Hugging Face model directory (AutoModel.from_pretrained); None = random init from the fields below."""
    tokenizer_path: str | None = None
    """Local Hugging Face tokenizer directory; None = the vocabulary written with the built-in dataset."""
    model_type: str = "bert"
    """transformers model type for random init (Chinese RoBERTa checkpoints use the BERT architecture)."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_length: int = 40
    """Tokens per caption after truncation (the official config uses 80; the built-in captions need <= 38)."""
    encoder_dropout: float = 0.0
    sa_layers: int = 4
    sa_heads: int = 4
    dropout: float = 0.0
    trainable_top_layers: int = -1
    """Train only the top N encoder layers (embeddings and lower layers frozen); -1 trains all. Official: 4."""
    grad_checkpointing: bool = False
    """Activation checkpointing of the online tower: every encoder layer (Hugging Face's own switch) and every
    token self-attention layer recomputed in the backward (non-reentrant)."""


@dataclass
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128
    """Size D of the joint embedding space."""
    head_hidden_dim: int | None = None
    """Hidden size of each tower's 2-layer MLP head; None = embed_dim."""


@dataclass
class MocoConfig:
    queue_size: int = 1024
    """K, number of keys in each of the two queues."""
    momentum: float = 0.99
    """m in theta_m <- m * theta_m + (1 - m) * theta."""
    tau_init: float = 0.07
    tau_min: float = 0.01
    tau_max: float = 1.0
    learn_tau: bool = True
    negatives: str = "queue"
    """queue (the paper's cross-modal MoCo), batch (CLIP's InfoNCE over the all-gathered global batch, no momentum
    encoders) or queue+batch (ALBEF: the batch's momentum keys joined to the queue); see brivl_ds/moco/loss.py."""
    mask_false_negatives: bool = False
    """Leave a negative out of a query's loss when its pair has the query's image (same bytes) or caption (same
    normalised text): copies of the query's own pair are not negatives."""
    loss_impl: str = "auto"
    """Queue-contrastive loss: auto (Triton kernel on CUDA or under TRITON_INTERPRET=1), triton, reference."""
    momentum_impl: str = "auto"
    """Momentum (EMA) update: auto, triton, reference."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw (torch AdamW, fp32 states) or adamw_half (brivl_kernels.AdamWHalfStates, bf16 states)."""
    lr: float = 1e-3
    weight_decay: float = 0.05
    """Decoupled weight decay on every weight except gains, biases and the temperature."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    """Cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables (set explicitly: DeepSpeed 0.19.8 silently clips at 1.0)."""


@dataclass
class AugmentConfig:
    crop_scale_min: float = 1.0
    """Random crop keeps at least this share of the image area (1.0 = no crop)."""
    crop_ratio_min: float = 3 / 4
    """Aspect-ratio (width / height) range of the random crop, sampled log-uniformly like torchvision's
    RandomResizedCrop; the crop is then resized to a square."""
    crop_ratio_max: float = 4 / 3
    hflip_prob: float = 0.0
    blur_prob: float = 0.0
    grayscale_prob: float = 0.0
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength (hue is left alone: captions name colours)."""


@dataclass
class DataConfig:
    train_path: str | None = None
    """Parquet shards (a directory, a manifest.json or a file); None = the built-in generated shapes dataset."""
    eval_path: str | None = None
    zeroshot_path: str | None = None
    """Labelled images classified zero-shot at every evaluation, next to the recall (top-1, and top-5 with more
    than 5 classes): an ImageFolder tree (<class name>/<images>) or Parquet shards with a label column; None = none,
    except on the built-in dataset, whose held-out split is used (labelled by background colour, or for shapes-hard
    by the large object's colour and kind; written once to <synthetic_dir>/zeroshot by
    brivl_ds.evaluation.zeroshot.make_shapes_benchmark)."""
    zeroshot_classes: str | None = None
    """The zero-shot class names, one per line (their order defines integer labels); needed with zeroshot_path."""
    zeroshot_templates: str = "zh"
    """Zero-shot prompts: zh (the built-in Chinese templates), none (the bare class name), or a file with one
    template per line, {} where the class name goes."""
    zeroshot_label_column: str = "label"
    """The label column of zero-shot Parquet shards: class names or integer indices into zeroshot_classes."""
    synthetic_variant: str = "shapes"
    """Which built-in dataset: `shapes` (the quick start's: 1-3 objects, 8 colours x 5 kinds, named by size) or
    `shapes-hard` (2-5 objects in 11 colours x 8 kinds, one of them large, a vertical relation; captions fit 40
    tokens; zero-shot classes: the large object's colour and kind, 88). brivl_ds/data/synthetic.py."""
    synthetic_dir: str | None = None
    """Where the built-in dataset is generated (once; reused when present); None = runs/data/<synthetic_variant>."""
    synthetic_train: int = 6000
    synthetic_eval: int = 500
    batch_size: int = 16
    """Micro-batch per data-parallel rank; the global batch is batch_size x ranks x grad_accum_steps."""
    num_workers: int = 0
    """DataLoader worker processes per rank (decode + augment + tokenise); 0 = in the training process."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""
    shuffle_block_rows: int = 1024
    """Rows shuffled together within a rank's span of an epoch (on top of the per-epoch row-group order); a worker
    holds about this many encoded images in memory."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    grid_boxes: int = 0
    """Rows without boxes get a g x g grid of boxes (the official later version uses 6); 0 = whole image only."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel size (megatron-core): both towers' transformer layers and heads are split over this many
    ranks (the GPUs of one node), ZeRO-3 shards over the rest (data parallel). 1 = off."""
    vocab_parallel: bool = False
    """With TP > 1, also split the text encoder's word embedding by vocabulary rows (padded with zero rows to a
    multiple of TP); off, every TP rank holds the whole embedding."""
    sequence_parallel: bool = False
    """Refused: DeepSpeed would not all-reduce the LayerNorm gradients of sequence-parallel regions."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/tiny"
    ds_config: str | None = None
    """DeepSpeed JSON (ZeRO, precision); None = ds_configs/<preset>.json."""
    epochs: int = 1
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 = run all epochs."""
    grad_accum_steps: int = 1
    seed: int = 1234
    log_every: int = 10
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    eval_at_end: bool = True
    save_eval_embeddings: bool = False
    """Also write the held-out embeddings of each evaluation to <output_dir>/eval_embeddings.pt (row order)."""
    stop_at_step: int = -1
    """Checkpoint and exit after this step without changing the LR schedule (time-limited jobs, preemption
    drills); -1 = run to the end."""
    staleness_every: int = 0
    """Every N steps, measure how stale the queue is (brivl_ds/moco/staleness.py: the loss against the queue vs
    against its samples re-encoded by today's momentum encoder); a study tool for small presets; 0 = off."""
    resume: str = "auto"
    """auto (latest checkpoint in output_dir if any), none, or a checkpoint directory."""
    threads: int = 0
    """torch intra-op threads per process (0 = leave torch's default)."""
    progress_bar: bool = True


@dataclass
class ResilienceConfig:
    keep_last: int = 3
    """Published checkpoints kept (oldest deleted first; the one a run resumed from is never deleted); 0 keeps all."""
    verify_checksums: bool = True
    """On resume, check every checkpoint file's SHA-256 against its manifest (the ranks share the hashing), not
    only its size; a damaged checkpoint is skipped for the previous one."""
    collective_timeout_s: float = 1800.0
    """Timeout of every collective (torch.distributed): a peer that died turns into an error, not a silent hang."""
    hang_timeout_s: float = 1200.0
    """A rank that makes no progress (a step, a batch, a save) for this long stops the job with an error naming
    the stalled rank and step; keep it above the longest save or evaluation; 0 disables the watchdog."""
    heartbeat_every: int = 100
    """Every N steps rank 0 logs a heartbeat line: which rank waited longest for its data, step times; 0 = off."""
    max_consecutive_skips: int = 10
    """Stop after this many optimizer steps in a row were skipped for a non-finite loss or gradient norm."""


@dataclass
class DrillConfig:
    """Fault drills: inject a fault on purpose to rehearse recovery (the tests use the same switches). Steps are
    the optimizer step being trained (1-based); -1 = off."""
    nonfinite_loss_at_step: int = -1
    """Multiply rank `nonfinite_loss_rank`'s loss by NaN at this step (and the next `nonfinite_loss_steps` - 1)."""
    nonfinite_loss_rank: int = 0
    nonfinite_loss_steps: int = 1
    poison_row: int = -1
    """Set the image of this dataset row (its global row id) to NaN when a rank trains on it."""
    stall_at_step: int = -1
    """Rank `stall_rank` stops making progress while it waits for this step's batch (a stuck reader)."""
    stall_rank: int = 0
    crash_at_step: int = -1
    """Rank `crash_rank` kills itself (SIGKILL) during this step (`crash_during=step`: between backward and the
    optimizer step) or during this step's checkpoint save (`crash_during=save`: after its first file is written)."""
    crash_rank: int = 0
    crash_during: str = "step"
    fail_save_at_step: int = -1
    """Rank `fail_save_rank`'s checkpoint write at this step fails with 'No space left on device'."""
    fail_save_rank: int = 0


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    drill: DrillConfig = field(default_factory=DrillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """The config `to_dict` wrote: the saved preset's defaults, then every saved value (fields added since
        keep their preset defaults; fields since removed are ignored)."""
        cfg = get_preset(values["preset"]) if "preset" in values else cls()
        _fill(cfg, values)
        return cfg

    def validate(self) -> "Config":
        """Refuse settings no run can use, before any process group or model exists."""
        if self.parallel.sequence_parallel:
            raise ValueError("parallel.sequence_parallel is not supported: DeepSpeed would not all-reduce the "
                             "LayerNorm gradients of sequence-parallel regions")
        if self.train.staleness_every and self.moco.negatives == "batch":
            raise ValueError("train.staleness_every measures the queue; moco.negatives=batch has none")
        if self.data.train_path is not None and self.model.text.tokenizer_path is None \
                and self.model.text.pretrained_path is None:
            raise ValueError("set model.text.tokenizer_path (a local Hugging Face tokenizer directory) "
                             "when training on your own shards")
        if self.data.zeroshot_path is not None and self.data.zeroshot_classes is None:
            raise ValueError("data.zeroshot_path needs data.zeroshot_classes (a file of class names, one per line)")
        return self

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------- presets
def tiny() -> Config:
    """Runs on a 2-core CPU in about a second per step: the quick start and the tests."""
    cfg = Config(preset="tiny")
    cfg.train.max_steps = 400
    cfg.train.output_dir = "runs/tiny"
    return cfg


def base() -> Config:
    """The official inference config: tf_efficientnet_b5_ns @380, RoBERTa-base-sized text, D=2048, K=9600."""
    cfg = Config(preset="base")
    cfg.model.image = ImageTowerConfig(
        backbone="tf_efficientnet_b5.ns_jft_in1k", image_size=380, width=1024, num_layers=4, num_heads=4,
        dropout=0.1, trainable_backbone_groups=2,
    )
    cfg.model.text = TextTowerConfig(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_length=80, encoder_dropout=0.1,
        sa_layers=4, sa_heads=4, dropout=0.1, trainable_top_layers=4,
    )
    cfg.model.embed_dim = 2048
    cfg.moco = MocoConfig(queue_size=9600, momentum=0.99, tau_init=0.07)
    cfg.optim = OptimConfig(lr=1e-4, weight_decay=0.05, warmup_steps=1000)
    cfg.data.batch_size = 16
    cfg.data.augment = AugmentConfig(crop_scale_min=0.6, hflip_prob=0.5, blur_prob=0.2, grayscale_prob=0.1,
                                     color_jitter=0.4)
    cfg.train.output_dir = "runs/base"
    cfg.train.epochs = 15
    return cfg


def paper_1b() -> Config:
    """The paper's ~1B-parameter model (online + momentum): B7 @600, Chinese RoBERTa-large, D=2560, K=16384,
    16 per GPU x 128 A100 = 2048, 15 epochs, AdamW, cosine."""
    cfg = base()
    cfg.preset = "paper-1b"
    cfg.model.image = ImageTowerConfig(
        backbone="tf_efficientnet_b7.ns_jft_in1k", image_size=600, width=1024, num_layers=4, num_heads=4,
        dropout=0.1, trainable_backbone_groups=2,
    )
    cfg.model.text = TextTowerConfig(
        hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, max_length=80, encoder_dropout=0.1,
        sa_layers=4, sa_heads=16, dropout=0.1, trainable_top_layers=4,
    )
    cfg.model.embed_dim = 2560
    cfg.moco = MocoConfig(queue_size=16384, momentum=0.99, tau_init=0.05)
    cfg.optim.name = "adamw_half"  # the paper's half-precision Adam statistics (bf16 moments, fp32 master)
    cfg.train.output_dir = "runs/paper-1b"
    return cfg


def ten_b() -> Config:
    """The paper's planned ~10B parameters (online + momentum), trained from scratch: a ViT-G/14 image tower with
    QK-norm and LayerScale (large ViTs diverge without them), a 36 x 2,560 text encoder, both activation-
    checkpointed; the paper-1b objective (D, K, tau, m, 16 per GPU) and half-precision Adam states."""
    cfg = paper_1b()
    cfg.preset = "10b"
    cfg.model.image = ImageTowerConfig(
        backbone="vit_gigantic_patch14_224", image_size=224, width=1664, num_layers=4, num_heads=16, dropout=0.0,
        qk_norm=True, layer_scale=1e-5, trainable_backbone_groups=-1, grad_checkpointing=True,
    )
    cfg.model.text = TextTowerConfig(
        hidden_size=2560, num_layers=36, num_heads=32, intermediate_size=10240, max_length=80, encoder_dropout=0.0,
        sa_layers=4, sa_heads=32, dropout=0.0, trainable_top_layers=-1, grad_checkpointing=True,
    )
    cfg.train.output_dir = "runs/10b"
    return cfg


PRESETS: dict[str, Callable[[], Config]] = {"tiny": tiny, "base": base, "paper-1b": paper_1b, "10b": ten_b}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------------------- overrides
def _parse_value(text: str, annotation: Any) -> Any:
    """Convert a command-line string to the field's declared type (int, float, bool, str, X | None)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(text, args[0])
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if annotation in (int, float, str):
        return annotation(text)
    raise TypeError(f"cannot parse a value of type {annotation} from the command line")


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; unknown keys are an error, not a silent no-op."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form section.field=value")
    key, text = assignment.split("=", 1)
    *path, leaf = key.strip().split(".")
    node: Any = cfg
    for part in path:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            raise KeyError(f"unknown config section {part!r} in {key!r}")
        node = getattr(node, part)
    hints = typing.get_type_hints(type(node))
    if leaf not in hints or dataclasses.is_dataclass(getattr(node, leaf, None)):
        valid = ", ".join(f.name for f in dataclasses.fields(node))
        raise KeyError(f"unknown config field {key!r}; fields here: {valid}")
    setattr(node, leaf, _parse_value(text.strip(), hints[leaf]))


def _fill(node: Any, values: dict[str, Any]) -> None:
    """Copy a saved config dict onto a dataclass tree, section by section."""
    for f in dataclasses.fields(node):
        if f.name not in values:
            continue
        if dataclasses.is_dataclass(getattr(node, f.name)):
            _fill(getattr(node, f.name), values[f.name])
        else:
            setattr(node, f.name, values[f.name])


def build_config(preset: str, overrides: list[str] | None = None) -> Config:
    cfg = get_preset(preset)
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    return cfg
