"""The family loaders behind ``sslhub.load_encoder``: one module per source of weights.

- ``layout``: which layout a folder is in (sslhub, timm, open_clip, transformers), from its files
- ``hub``: ``hf-hub:ORG/NAME[@REVISION]`` snapshots, and failing fast without a network
- ``timm_encoder``, ``open_clip_encoder``, ``transformers_encoder``: one ``Encoder`` subclass each

Each family module imports its library only when used, so ``import sslhub`` stays light.
"""
