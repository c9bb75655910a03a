"""Inference: load_encoder and the family loaders, zero-shot classification, FAISS retrieval, attention maps."""
