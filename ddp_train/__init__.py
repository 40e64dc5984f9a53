"""Distributed CIFAR-100 training: FFCV betons → DDP (AMP, channels_last) → exact global metrics → MLflow."""
