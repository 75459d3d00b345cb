"""The flow view on the 2-D ring of 8 Gaussians (oracle preset ring8_2d: exact scores known)."""

from experiments.configs import base


def get_config():
    return base.toy_config("flow")
