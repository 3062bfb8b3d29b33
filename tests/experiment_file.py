"""An experiments/NAME.py file as the CLIs load it: its module, or its get_config(arg)."""

import importlib.util
import os

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def module(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
  loaded = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loaded)
  return loaded


def config(name: str, arg=None):
  return module(name).get_config(arg)
