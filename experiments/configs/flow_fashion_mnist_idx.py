"""The flow view on Fashion-MNIST read from IDX files (Debian's dataset-fashion-mnist by default)."""

from experiments.configs import base


def get_config():
    return base.mnist_view_config("flow", "fashion_mnist", idx_dir=base.DEBIAN_FASHION_MNIST)
