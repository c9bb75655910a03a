"""The backbone architectures that training builds and inference rebuilds (timm + the CIFAR stem)."""
