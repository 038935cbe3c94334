"""A study's trainer for tests/test_ray.py, in a module of its own: a Ray worker imports it by this name
(tests.ray_toy, from the driver's folder), where a test module's own name (pytest's) is unknown to it."""
from __future__ import annotations

import os
import time

from raclora.errors import ConfigError


class Failing:
    """A study's trainer on a Ray worker that raises the study's own error (``how`` "raise") or whose process dies
    (``how`` "die": what a lost node looks like to the driver) on the run of seed 1; any other run trains."""

    def __init__(self, how: str, show_epochs: bool = False):
        self.how = how

    def run(self, specs):
        if any(s["seed"] == 1 for s in specs):
            time.sleep(2)  # after seed 0's stack has returned
            if self.how == "die":
                os._exit(1)
            raise ConfigError("the study's own one-line error")
        return [(dict(name="toy", seed=s["seed"], test_acc=0.5, config_hash=f"toy-{s['seed']}", device="cpu"),
                 [dict(config_hash=f"toy-{s['seed']}", epoch=1, test_acc=0.5)]) for s in specs]
