"""Publishing: exported folders (timm / open_clip layouts), model cards, pushes to the Hub."""
