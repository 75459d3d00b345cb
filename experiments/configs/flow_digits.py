"""Rectified flow / flow matching on scikit-learn's 8x8 digits (offline), vp_digits' network.

The velocity eps - x0 with the flow-matching loss and logit-normal times; Euler steps uniform in t
(base.set_view(config, 'flow', ...)).
"""

from experiments.configs import base


def get_config():
    return base.digits_config("flow")
