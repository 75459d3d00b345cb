"""The flow view of the model family on Fashion-MNIST (TFDS); see base.set_view."""

from experiments.configs import base


def get_config():
    return base.mnist_view_config("flow", "fashion_mnist")
