"""Model cards: YAML metadata + a readable summary, written only from what was recorded.

Every figure in a card comes from the ``eval`` block of the export's config.json — evaluations
that were actually run on that checkpoint.  Nothing is filled in by hand.
"""
from __future__ import annotations

import json
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sslhub import formats

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Use

```python
from sslhub import load_encoder

encoder = load_encoder("{{ repo_hint }}")
features = encoder.embed_images(["image.jpg"])  # (1, {{ dim }})
```
{{ timm_use }}
## Training

| | |
|---|---|
{{ training_table }}

## Evaluation

{{ eval_text }}
{{ pictures }}

## Recipe

```json
{{ recipe }}
```
"""


def _eval_results(ev: dict) -> list[EvalResult]:
    """``model-index`` entries for the evaluations recorded in the export (nothing else)."""
    out = []
    knn = ev.get("knn") or {}
    for key, value in knn.items():
        if key.startswith("top1@k="):
            out.append(EvalResult(task_type="image-classification", task_name="k-NN on frozen features",
                                  dataset_type="image-folder", dataset_name=str(knn.get("test", "")),
                                  dataset_split="test", metric_type="accuracy", metric_value=value,
                                  metric_name=f"k-NN top-1 (k={key.split('=')[1]}, T={knn['temperature']})"))
    for z in ev.get("zeroshot") or []:
        out.append(EvalResult(task_type="zero-shot-image-classification", task_name="zero-shot classification",
                              dataset_type="image-folder", dataset_name=str(z["data"]), dataset_split=z["split"],
                              metric_type="accuracy", metric_value=z["top1"],
                              metric_name=f"zero-shot top-1 ({z['template_set']} templates, {z['classes']} classes)"))
    ret = ev.get("retrieval") or {}
    for direction in ("image_to_text", "text_to_image"):
        for k, value in (ret.get(direction) or {}).items():
            out.append(EvalResult(task_type="image-to-text" if direction == "image_to_text" else "text-to-image",
                                  task_name=f"{direction.replace('_', '→').replace('→to→', '→')} retrieval",
                                  dataset_type="image-folder", dataset_name=str(ret["data"]),
                                  dataset_split=ret["split"], metric_type="recall", metric_value=value,
                                  metric_name=f"{direction.replace('_to_', '→')} {k}"))
    return out


def describe(config: dict[str, Any]) -> tuple[str, int | None, str, str]:
    """``(architecture, embedding size, input size, layout)`` of an sslhub export's config (either layout)."""
    if "model_cfg" in config:  # open_clip layout (CLIP exports)
        mcfg, pp = config["model_cfg"], config.get("preprocess_cfg", {})
        arch = config.get("sslhub", {}).get("architecture", "open_clip model")
        return arch, mcfg.get("embed_dim"), f"3×{pp.get('size')}×{pp.get('size')}", "open_clip"
    return config["architecture"], config.get("num_features"), str(config["pretrained_cfg"]["input_size"]), "timm"


def _eval_text(ev: dict) -> str:
    lines = []
    if "knn" in ev:
        knn = ev["knn"]
        lines.append(f"Weighted k-NN on frozen, L2-normalised features (T = {knn['temperature']}); bank "
                     f"`{knn.get('bank')}` ({knn['bank_size']} images), queries `{knn.get('test')}` ({knn['test_size']}).\n")
        lines.append("| k | top-1 (%) | top-5 (%) |\n|---|---|---|")
        for key in knn:
            if key.startswith("top1@k="):
                k = key.split("=")[1]
                lines.append(f"| {k} | {knn[key]} | {knn.get(f'top5@k={k}')} |")
    for name, value in (ev.get("pretext") or {}).items():
        lines.append(f"\nPretext task on the k-NN query set: {name} = {value:.4f}")
    if ev.get("zeroshot"):
        lines.append("\nZero-shot classification (class embeddings: each template's normalised text embedding, "
                     "averaged per class and renormalised):\n")
        lines.append("| data | split | classes | templates | top-1 (%) | top-5 (%) | mean per-class recall (%) |\n"
                     "|---|---|---|---|---|---|---|")
        for z in ev["zeroshot"]:
            lines.append(f"| `{z['data']}` | {z['split']} | {z['classes']} | {z['template_set']} ({z['templates']}) | "
                         f"{z['top1']} | {z.get('top5', '–')} | {z.get('mean_per_class_recall', '–')} |")
    ret = ev.get("retrieval")
    if ret:
        ks = list(ret["image_to_text"])
        lines.append(f"\nImage↔text retrieval on `{ret['data']}` ({ret['split']}: {ret['images']} images, "
                     f"{ret['captions']} captions), recall (%):\n")
        lines.append("| direction | " + " | ".join(ks) + " |\n|---|" + "---|" * len(ks))
        for direction in ("image_to_text", "text_to_image"):
            lines.append(f"| {direction.replace('_to_', ' → ')} | " + " | ".join(str(ret[direction][k]) for k in ks) + " |")
    return "\n".join(lines) if lines else "No evaluation was run on this checkpoint."


def _pictures(s: dict) -> str:
    """The export's pictures (files beside the card) with their captions."""
    pics = s.get("pictures") or {}
    return "".join(f"\n![{caption}]({name})\n\n_{caption}._\n" for name, caption in pics.items())


def render_card(config: dict[str, Any], repo_hint: str = "path/to/export") -> str:
    s = config.get("sslhub", {})
    method = s.get("method", "unknown")
    arch, dim, input_size, layout = describe(config)
    ev = s.get("eval", {}) or {}
    clip = layout == "open_clip"
    data = ModelCardData(
        library_name="open_clip" if clip else "sslhub",
        license="other",
        tags=["sslhub", "self-supervised-learning", method]
             + (["clip", "zero-shot-image-classification", "open_clip"] if clip else ["image-feature-extraction", "timm"]),
        pipeline_tag="zero-shot-image-classification" if clip else "image-feature-extraction",
        model_name=f"{arch}-{method}",
        datasets=[str(s["train_data"])] if s.get("train_data") else None,
        eval_results=_eval_results(ev) or None,
    )
    rows = {
        "method": f"{method} ({s.get('paper', '')})",
        "architecture": f"`{arch}` ({dim}-d {'image and text embeddings' if clip else 'features'}), input {input_size}",
        "training data": f"`{s.get('train_data', '?')}` ({s.get('train_images', '?')} images)",
        "steps": s.get("steps"),
        "effective batch": s.get("global_batch"),
        "processes": s.get("processes"),
        "seed": (s.get("recipe") or {}).get("seed"),
        "training time (s)": s.get("train_seconds"),
        "recipe file": f"`{s.get('recipe_file', '')}`",
    }
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items() if v not in (None, ""))
    eval_text = _eval_text(ev)
    timm_use = ""
    if clip:
        timm_use = ('\nPlain open_clip loads the same weights:\n\n```python\nimport open_clip\n'
                    'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:path/to/export")  '
                    '# or "hf-hub:ORG/NAME"\ntokenizer = open_clip.get_tokenizer("local-dir:path/to/export")\n```\n')
        if "hf_model_name" in config["model_cfg"].get("text_cfg", {}):
            timm_use += ("\nThe text tower's weights are in the checkpoint; plain open_clip reads its transformers "
                         f"config from `{config['model_cfg']['text_cfg']['hf_model_name']}` on the Hub, sslhub from "
                         "`text_config/` in this folder (offline).\n")
    elif not arch.endswith("_cifar"):
        timm_use = ('\nPlain timm loads the same weights:\n\n```python\nimport timm\n'
                    'model = timm.create_model("local-dir:path/to/export", pretrained=True)  # or "hf-hub:ORG/NAME"\n```\n')
    else:
        timm_use = ("\nThe CIFAR stem (3x3 stride-1 conv, no max-pool) is registered in timm as "
                    f"`{arch}` by `import sslhub`; after that import, `timm.create_model(\"local-dir:…\", "
                    "pretrained=True)` loads these weights too.\n")
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, title=f"{arch} trained with {method} (sslhub)",
        summary=(f"An image–text model (image and text towers, `{arch}`) trained with **{method}** by sslhub."
                 if clip else f"A self-supervised image encoder: `{arch}` pre-trained with **{method}** by sslhub."),
        repo_hint=repo_hint, dim=dim, training_table=table, eval_text=eval_text,
        timm_use=timm_use, pictures=_pictures(s), recipe=json.dumps(s.get("recipe", {}), indent=1))
    return str(card)


INDEX_HEADER = """# Model cards

Generated by `sslhub cards {args}` — do not edit by hand; rerun it after training or evaluating.

Every export sslhub writes carries a model card (`README.md` beside `model.safetensors`) rendered from
the export's own `config.json`: YAML metadata (library, license, tags, pipeline tag, `model-index`
with the evaluations actually run on that checkpoint), the method and its paper, the recipe, seed,
steps, effective batch, training time and data. A figure that was not measured is not in a card.

## Checkpoints documented here

| checkpoint | method | architecture | data | steps | batch | train time (s) | k-NN top-1 (k=20) | k-NN top-1 (k=200) | pretext | zero-shot top-1 | retrieval R@1/5/10 (image→text; text→image) |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def card_index(exports: list[str], args: str = "") -> str:
    """MODEL_CARDS.md: the card template's description and one row per export folder."""
    from pathlib import Path

    rows = []
    for folder in exports:
        path = Path(folder)
        name = formats.CONFIG if (path / formats.CONFIG).is_file() else formats.OPEN_CLIP_CONFIG
        cfg = json.loads((path / name).read_text())
        s = cfg.get("sslhub", {})
        ev = s.get("eval", {}) or {}
        knn = ev.get("knn", {})
        pretext = ", ".join(f"{k} {v:.3f}" for k, v in (ev.get("pretext") or {}).items()) or "–"
        method = s.get("method") if s.get("steps") else "none (random init)"
        extra = {k: v for k, v in cfg.get("model_args", {}).items() if k != "num_classes"}
        arch = f"`{describe(cfg)[0]}`" + (f" {json.dumps(extra)}" if extra else "")
        zs = "; ".join(f"{z['top1']} ({Path(z['data']).name} {z['split']})" for z in ev.get("zeroshot") or []) or "–"
        ret = ev.get("retrieval")
        rt = "; ".join("/".join(str(v) for v in ret[d].values()) for d in ("image_to_text", "text_to_image")) \
            + f" ({Path(ret['data']).name} {ret['split']})" if ret else "–"
        rows.append(f"| `{folder}` | {method} | {arch} | `{s.get('train_data')}` | "
                    f"{s.get('steps')} | {s.get('global_batch')} | {s.get('train_seconds')} | "
                    f"{knn.get('top1@k=20', '–')} | {knn.get('top1@k=200', '–')} | {pretext} | {zs} | {rt} |")
    return INDEX_HEADER.format(args=args) + "\n".join(rows) + "\n"
