"""CIFAR-100 → FFCV betons: read the official archive (download, local file or directory) or a generated
synthetic set in the same format, validate it, and write train/test betons plus a manifest atomically."""
