"""Zero-shot speed: sslhub against open_clip's own code on the same model, images and prompts, same run.

1. Classification images/s: ``ZeroShotClassifier.predict_proba`` vs open_clip's loop (its preprocess per PIL
   image, ``encode_image``, ``100 · img @ W`` softmax, as CLIP_benchmark does).
2. Class matrix build time for C ImageNet class names × the 80 OpenAI templates: sslhub's
   ``build_class_matrix`` (prompts sorted by length, batches trimmed after the end-of-text token)
   vs ``open_clip.build_zero_shot_classifier`` (full 77-token context), with the max abs difference.
   open_clip's way costs the same for every prompt (all run at 77 tokens), ~16 prompts/s here: 1,000
   classes × 80 templates would take ~80 min, so it is timed on the first R classes
   (``--reference-classes``) and scaled by C / R; both sides are also timed on those R classes alone,
   and the R rows of sslhub's 1,000-class matrix are compared with open_clip's.

No pretrained weights can be downloaded here, so the model is open_clip's ViT-B-32 architecture with
random weights (speed does not depend on the weights; equality is checked on the same weights).

    python bench/zeroshot.py [--arch ViT-B-32] [--classes 1000] [--reference-classes 25] [--images 256] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import update_section  # noqa: E402


def save_open_clip(arch: str, folder: Path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    model.eval()
    cfg = open_clip.get_model_config(arch)
    pp = {"size": cfg["vision_cfg"]["image_size"], "mean": list(open_clip.OPENAI_DATASET_MEAN),
          "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model, preprocess, open_clip.get_tokenizer(arch)


def timed(fn, runs: int):
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--classes", type=int, default=1000, help="ImageNet class names used (×80 templates)")
    ap.add_argument("--reference-classes", type=int, default=25,
                    help="classes open_clip's class matrix is timed on (then scaled to --classes)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print the table instead of updating BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from open_clip import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from PIL import Image

    from sslhub import load_encoder
    from sslhub.data.images import decode_all
    from sslhub.data.sources import open_source
    from sslhub.inference.templates import IMAGENET_TEMPLATES
    from sslhub.inference.zeroshot import ZeroShotClassifier, build_class_matrix

    folder = Path(tempfile.mkdtemp())
    model, preprocess, tokenizer = save_open_clip(args.arch, folder)
    enc = load_encoder(folder)
    names = list(IMAGENET_CLASSNAMES[: args.classes])

    # 2. class matrix
    ref_names = names[: args.reference_classes]
    with torch.no_grad():
        t_ref, ref = timed(lambda: build_zero_shot_classifier(model, tokenizer, ref_names, IMAGENET_TEMPLATES,
                                                              num_classes_per_batch=10), 1)
    t_ours_ref, ours_ref = timed(lambda: build_class_matrix(enc, ref_names, IMAGENET_TEMPLATES, progress=False),
                                 args.runs)
    t_ours, ours = timed(lambda: build_class_matrix(enc, names, IMAGENET_TEMPLATES, progress=True), 1)
    diff = max((ours[: len(ref_names)] - ref.T).abs().max().item(), (ours_ref - ref.T).abs().max().item())
    t_ref_full = t_ref * len(names) / len(ref_names)  # open_clip: the same cost per prompt

    # 1. classification
    data = decode_all(open_source(REPO / "data/cifar10-sample", "test"), 32, progress=False)
    images = [Image.fromarray(data.images[i % len(data)].permute(1, 2, 0).numpy()).resize((224, 224))
              for i in range(args.images)]
    clf = ZeroShotClassifier(enc, names, templates=IMAGENET_TEMPLATES[:1], cache=False)
    w = clf.weights.T

    def open_clip_loop():
        with torch.no_grad():
            probs = []
            for i in range(0, len(images), 64):
                x = torch.stack([preprocess(im) for im in images[i : i + 64]])
                f = model.encode_image(x, normalize=True)
                probs.append((model.logit_scale.exp() * f @ w).softmax(-1))
            return torch.cat(probs)

    t_loop, ref_p = timed(open_clip_loop, args.runs)
    t_clf, p = timed(lambda: clf.predict_proba(images), args.runs)
    pdiff = (p - ref_p).abs().max().item()
    n_prompts, n_ref = len(names) * len(IMAGENET_TEMPLATES), len(ref_names) * len(IMAGENET_TEMPLATES)
    res = {"arch": args.arch, "classes": len(names), "templates": len(IMAGENET_TEMPLATES), "prompts": n_prompts,
           "class_matrix_s": {"sslhub": round(t_ours, 2), "open_clip_scaled": round(t_ref_full, 2),
                              "speedup": round(t_ref_full / t_ours, 2), "max_abs_diff": diff,
                              "reference_classes": len(ref_names), "sslhub_reference": round(t_ours_ref, 2),
                              "open_clip_reference": round(t_ref, 2)},
           "classify_img_s": {"sslhub": round(len(images) / t_clf, 1), "open_clip": round(len(images) / t_loop, 1),
                              "ratio": round(t_loop / t_clf, 2), "max_prob_diff": pdiff}}
    body = "\n".join([
        f"Model: open_clip `{args.arch}` architecture (random weights: none can be downloaded here), 2 threads. "
        f"Command: `python bench/zeroshot.py --arch {args.arch} --classes {args.classes} --images {args.images} "
        f"--reference-classes {args.reference_classes} --runs {args.runs}`; classification and the "
        f"{len(ref_names)}-class sslhub matrix: medians of {args.runs} runs; the {len(names)}-class matrix and "
        "open_clip's class matrix: 1 run each (the long ones); both libraries measured in the same run. open_clip "
        f"runs every prompt at the full 77-token context, so its {len(names)}-class time is its "
        f"{len(ref_names)}-class time × {len(names) / len(ref_names):g} (marked *scaled*).", "",
        "| what | sslhub | open_clip | sslhub advantage | max abs difference |", "|---|---|---|---|---|",
        f"| class matrix, {len(ref_names)} classes × 80 templates ({n_ref} prompts) | {t_ours_ref:.1f} s | "
        f"{t_ref:.1f} s | {t_ref / t_ours_ref:.2f}× | {(ours_ref - ref.T).abs().max().item():.1e} |",
        f"| class matrix, {len(names)} classes × 80 templates ({n_prompts} prompts) | {t_ours:.1f} s | "
        f"{t_ref_full:.0f} s (*scaled*) | {t_ref_full / t_ours:.2f}× | {diff:.1e} (first {len(ref_names)} classes) |",
        f"| zero-shot classification, {len(images)} PIL images | {len(images) / t_clf:.1f} img/s | "
        f"{len(images) / t_loop:.1f} img/s | {t_loop / t_clf:.2f}× | {pdiff:.1e} (probabilities) |"])
    if args.no_write:
        print(body)
    else:
        update_section(REPO / "BENCHMARKS.md", "zeroshot", "Zero-shot speed (issue 3)", body)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
