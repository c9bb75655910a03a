"""Model cards: YAML metadata + a readable summary, written only from what was recorded.

Every figure in a card comes from the ``eval`` block of the export's config.json — evaluations
that were actually run on that checkpoint.  Nothing is filled in by hand.
"""
from __future__ import annotations

import json
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

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

## Recipe

```json
{{ recipe }}
```
"""


def _knn_results(knn: dict) -> list[dict]:
    res = []
    for key, value in knn.items():
        if key.startswith("top1@k="):
            res.append({"type": "accuracy", "name": f"k-NN top-1 (k={key.split('=')[1]}, T={knn['temperature']})",
                        "value": value})
    return res


def render_card(config: dict[str, Any], repo_hint: str = "path/to/export") -> str:
    s = config.get("sslhub", {})
    method = s.get("method", "unknown")
    arch = config["architecture"]
    ev = s.get("eval", {}) or {}
    model_index = []
    if "knn" in ev:
        model_index.append({
            "name": f"{arch}-{method}",
            "results": [{"task": {"type": "image-classification", "name": "k-NN on frozen features"},
                         "dataset": {"name": ev["knn"].get("test", ""), "type": "image-folder"},
                         "metrics": _knn_results(ev["knn"])}],
        })
    data = ModelCardData(
        library_name="sslhub",
        license="other",
        tags=["sslhub", "self-supervised-learning", method, "image-feature-extraction", "timm"],
        pipeline_tag="image-feature-extraction",
        model_name=f"{arch}-{method}",
    )
    if model_index:
        data.model_index = model_index  # type: ignore[attr-defined]
    rows = {
        "method": f"{method} ({s.get('paper', '')})",
        "architecture": f"`{arch}` ({config.get('num_features')}-d features), input {config['pretrained_cfg']['input_size']}",
        "training data": f"`{s.get('train_data', '?')}` ({s.get('train_images', '?')} images)",
        "steps": s.get("steps"),
        "effective batch": s.get("global_batch"),
        "processes": s.get("processes"),
        "seed": (s.get("recipe") or {}).get("seed"),
        "training time (s)": s.get("train_seconds"),
        "recipe file": f"`{s.get('recipe_file', '')}`",
    }
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items() if v not in (None, ""))
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
    eval_text = "\n".join(lines) if lines else "No evaluation was run on this checkpoint."
    timm_use = ""
    if not arch.endswith("_cifar"):
        timm_use = ('\nPlain timm loads the same weights:\n\n```python\nimport timm\n'
                    f'model = timm.create_model("local-dir:path/to/export", pretrained=True)  # or "hf-hub:ORG/NAME"\n```\n')
    else:
        timm_use = ("\nThe CIFAR stem (3x3 stride-1 conv, no max-pool) is registered in timm as "
                    f"`{arch}` by `import sslhub`; after that import, `timm.create_model(\"local-dir:…\", "
                    "pretrained=True)` loads these weights too.\n")
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, title=f"{arch} trained with {method} (sslhub)",
        summary=f"A self-supervised image encoder: `{arch}` pre-trained with **{method}** by sslhub.",
        repo_hint=repo_hint, dim=config.get("num_features"), training_table=table, eval_text=eval_text,
        timm_use=timm_use, recipe=json.dumps(s.get("recipe", {}), indent=1))
    return str(card)
