"""Recipes: one YAML file says everything about a training run.

A recipe has a fixed, typed top level (``encoder``, ``data``, ``optim``, ``train``, ``eval``) and a
``method_args`` block typed by the chosen method's own ``Config`` dataclass.  ``--set a.b=value``
overrides any key; the value is parsed as YAML (``--set optim.lr=0.1``, ``--set
encoder.cifar_stem=false``, ``--set method_args.views.scale=[0.2,1.0]``).

This module imports no torch: the top level is checked first, so its errors come in well under a second;
the methods (and torch) are imported for ``method_args``, typed by the method's ``Config``.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from sslhub.config import ConfigError, check, from_dict, to_dict
from sslhub.models.encoder_config import EncoderConfig

METHODS = "sslhub.methods"  # importing it registers every method (and imports torch): done once the rest is checked


@dataclass
class DataConfig:
    train: str = ""  # shards folder / brace pattern / ImageFolder tree / flat folder of images
    split: str = "train"  # split to read from a folder with a dataset.json
    batch_size: int = 256  # global batch size (split across processes)
    num_workers: int = 2  # decoding processes (memory: once, before training; stream: during training)
    # memory: decode the whole set once before training; stream: read shards as training goes (sslhub.data.stream);
    # auto: memory when the decoded images (× processes on this machine) fit in cache_limit_mb, else stream
    cache: Literal["auto", "memory", "stream"] = "auto"
    cache_limit_mb: Optional[float] = None  # auto's limit; null → a quarter of the machine's memory
    lanes: Optional[int] = None  # stream: independent sample streams (a multiple of the processes); null → processes × workers
    shuffle_buffer: int = 2000  # stream: encoded samples each lane shuffles among
    uneven: Literal["drop", "repeat"] = "drop"  # stream: lanes of unequal size: drop the longer lanes' rest or repeat the shorter

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", "the global batch must be a positive integer")
        check(self.num_workers >= 0, "num_workers", "must be >= 0 (0 = decode in the main process)")
        check(self.cache_limit_mb is None or self.cache_limit_mb > 0, "cache_limit_mb", "must be > 0 MB (null: a "
              "quarter of the machine's memory)")
        check(self.lanes is None or self.lanes >= 1, "lanes", "must be >= 1 (null: processes × workers)")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", "must hold >= 1 sample (1: no shuffling within shards)")


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = "adamw"
    lr: float = 1e-3  # base learning rate at batch 256 (scaled linearly with the global batch)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = 1e-6
    momentum: float = 0.9  # SGD / LARS momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    trust_coefficient: float = 0.001  # LARS eta
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    clip_grad: Optional[float] = None  # max global grad norm, off when null

    def __post_init__(self):
        check(self.lr > 0, "lr", "the learning rate must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.momentum <= 1, "momentum", "must be in [0, 1]")
        check(all(0 <= b < 1 for b in self.betas), "betas", "AdamW's betas must be in [0, 1)")
        check(self.trust_coefficient > 0, "trust_coefficient", "LARS's eta must be > 0 (the paper: 0.001)")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "the final lr as a fraction of lr must be in [0, 1]")
        check(self.clip_grad is None or self.clip_grad > 0, "clip_grad", "a gradient-norm limit must be > 0 "
              "(null: no clipping)")


@dataclass
class TrainConfig:
    epochs: float = 100.0
    max_steps: Optional[int] = None  # overrides epochs when set
    accumulate: int = 1  # micro-batches of data.batch_size per optimiser step (a step sees batch_size × accumulate)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = torch.autocast on CPU or GPU
    channels_last: bool = False
    device: str = "auto"  # auto → cuda when available, else cpu
    log_every: int = 10  # steps between metric rows
    ckpt_every: int = 200  # steps between checkpoints (one more at the end)
    keep_checkpoints: int = 3  # the newest K checkpoints are kept (older ones deleted)
    threads: Optional[int] = None  # torch.set_num_threads; null → torch's default
    # how several processes average gradients (docs/distributed.md): auto → ddp on CUDA with one optimiser, else
    # manual; ddp = DistributedDataParallel (bucketed all-reduce overlapping backward, gloo on CPU too); manual =
    # one flat all-reduce after backward (needed by methods with several optimisers); one process: no wrapper
    parallel: Literal["auto", "ddp", "manual"] = "auto"

    def __post_init__(self):
        check(self.epochs > 0, "epochs", "must be > 0")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 (null: from epochs)")
        check(self.accumulate >= 1, "accumulate", "micro-steps per optimiser step must be >= 1")
        check(self.log_every >= 1, "log_every", "must be >= 1 step")
        check(self.ckpt_every >= 1, "ckpt_every", "must be >= 1 step")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must keep >= 1 checkpoint")
        check(self.threads is None or self.threads >= 1, "threads", "must be >= 1 (null: torch's default)")
        check(self.parallel in ("auto", "ddp", "manual"), "parallel", "must be auto, ddp or manual (auto: ddp on "
              "CUDA with one optimiser, else manual)")


@dataclass
class KnnEval:
    train: str = ""  # bank (labelled); empty → the training data
    # queries (labelled): "auto" → the training data's own test_split when it has one (a shards folder whose
    # dataset.json lists it), else k-NN is skipped with a note — never another data set; "" → skip; else a path
    test: str = "auto"
    train_split: str = "train"
    test_split: str = "test"
    k: tuple[int, ...] = (20, 200)
    temperature: float = 0.07

    def __post_init__(self):
        check(all(k >= 1 for k in self.k), "k", "every number of neighbours must be >= 1")
        check(self.temperature > 0, "temperature", "must be > 0 (Wu et al. 2018: 0.07)")


@dataclass
class ZeroShotEval:
    """Zero-shot classification of labelled ``data`` with prompt templates (image–text models)."""
    data: str = ""
    split: str = "test"
    templates: str = "default"  # default | imagenet | imagenet-simple | cifar | a file, one template a line
    classes: tuple[str, ...] = ()  # empty → the data's own class names


@dataclass
class RetrievalEval:
    """Image↔text recall@k over every image and caption of ``data`` (the Flickr/COCO protocol)."""
    data: str = ""  # empty → skip
    split: str = "test"
    k: tuple[int, ...] = (1, 5, 10)

    def __post_init__(self):
        check(all(k >= 1 for k in self.k), "k", "every recall@k must have k >= 1")


@dataclass
class EvalConfig:
    knn: KnnEval = field(default_factory=KnnEval)
    pretext: bool = True  # methods with a pretext task report their own accuracy on the test set
    zeroshot: list[ZeroShotEval] = field(default_factory=list)  # run on the export (needs a text tower)
    retrieval: RetrievalEval = field(default_factory=RetrievalEval)


@dataclass
class Recipe:
    method: str
    seed: int = 0
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method_args: Any = None  # the method's Config dataclass
    source: str = ""  # where the recipe came from (for the model card)

    def to_dict(self) -> dict:
        d = to_dict(self)
        d.pop("source")
        return d


def _set_dotted(tree: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"{where}: --set {dotted}: {k!r} is not a mapping")
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.1")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return pairs


def recipe_from_dict(raw: dict, where: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    """Type-check ``raw`` (+ ``--set`` overrides); an error about an overridden key names ``--set``, not the file."""
    raw = copy.deepcopy(raw or {})
    given = parse_overrides(overrides)
    for key, value in given:
        _set_dotted(raw, key, value, where)
    try:
        if "method" not in raw:
            raise ConfigError(f"{where}: missing required key 'method' (one of `sslhub methods`)", "method", where)
        method_args = raw.pop("method_args", None) or {}
        recipe = from_dict(Recipe, raw, where)
        try:
            method_cls = importlib.import_module(METHODS).get_method(raw["method"])
        except KeyError as e:
            raise ConfigError(f"{where}: method: {e.args[0]}", "method", where) from None
        recipe.method_args = from_dict(method_cls.Config, method_args, where, prefix="method_args.")
    except ConfigError as e:
        raise _blame_override(e, overrides or [], [k for k, _ in given]) from None
    recipe.source = where
    return recipe


def _blame_override(e: ConfigError, items: list[str], keys: list[str]) -> ConfigError:
    """The same error, naming the ``--set`` that gave the key when one did (the last one wins, as applied)."""
    if e.key is None or e.where is None or not str(e).startswith(f"{e.where}: "):
        return e
    for item, key in reversed(list(zip(items, keys))):
        if e.key == key or e.key.startswith((f"{key}.", f"{key}[")):
            return ConfigError(f"--set {item.strip()}: {str(e)[len(e.where) + 2:]}", e.key, f"--set {item}")
    return e


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML file, apply ``--set`` overrides and type-check everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found (recipes live in recipes/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return recipe_from_dict(raw, str(path), overrides)
