"""Every file name and format tag that sslhub writes or reads, in one place (a leaf module).

Writers and readers of a format both name it from here, so the two cannot drift apart.
"""

# ---- an sslhub export (timm's Hub layout + an "sslhub" section) ---------------------------------------
CONFIG = "config.json"  # timm / transformers / sslhub config
WEIGHTS = "model.safetensors"  # timm / transformers / sslhub weights
WEIGHTS_INDEX = "model.safetensors.index.json"  # transformers' sharded weights
CARD = "README.md"  # the model card
SSLHUB_SECTION = "sslhub"  # config.json section that marks an sslhub export
ENCODER_FORMAT = "sslhub-encoder"  # config["sslhub"]["format"] of a timm-layout export
FORMAT_VERSION = 1

# ---- open_clip's Hub layout ----------------------------------------------------------------------------
OPEN_CLIP_CONFIG = "open_clip_config.json"  # {"model_cfg", "preprocess_cfg"}
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_WEIGHTS_ALT = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
CLIP_FORMAT = "sslhub-clip"  # config["sslhub"]["format"] of an open_clip-layout export
TEXT_CONFIG_DIR = "text_config"  # a transformers text tower's config.json, beside open_clip_config.json

# ---- transformers' extra files -------------------------------------------------------------------------
PREPROCESSOR_CONFIG = "preprocessor_config.json"

# ---- pickle files: never loaded (unpickling runs code) -------------------------------------------------
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".ckpt", ".pkl")

# ---- a training run folder -----------------------------------------------------------------------------
RUN_RECIPE = "recipe.json"
RUN_METRICS_CSV = "metrics.csv"
RUN_METRICS_JSON = "metrics.json"
RUN_CURVES = "training_curves.png"
RUN_TENSORBOARD = "tensorboard"
RUN_EXPORT = "export"
RUN_CHECKPOINTS = "checkpoints"  # checkpoints/step-NNNNNNN.safetensors, the newest train.keep_checkpoints
RUN_REJECTED = "checkpoints/rejected"  # checkpoints --resume passed over (damaged, diverged or newer than it)
# timm.create_model / build_model_with_cfg arguments that load weights from a file or elsewhere: neither an
# export's config nor a recipe's encoder.model_args may set them (timm would torch.load a checkpoint_path)
WEIGHT_SOURCE_ARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                      "pretrained_strict", "pretrained_filter_fn")
CHECKPOINT_META_KEY = "sslhub_state"  # safetensors metadata key holding the checkpoint's structure
CHECKPOINT_SHA256_KEY = "sslhub_sha256"  # ... and the checksum of structure and tensors

# ---- a saved FAISS index folder ------------------------------------------------------------------------
INDEX_FAISS = "index.faiss"
INDEX_META = "meta.json"
INDEX_METADATA = "metadata.jsonl"

# ---- data -----------------------------------------------------------------------------------------------
DATASET_JSON = "dataset.json"  # a shards folder's splits and classes
