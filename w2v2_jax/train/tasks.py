"""What a training task adds to the shared loop; pre-training and CTC fine-tuning are its two kinds.

The loop (train/loop.py) and the step (train/step.py) know only this interface: the loss, the
parameters to freeze, the first parameters, the evaluation's extra metrics, the console line and
what a checkpoint carries besides the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from w2v2_jax.models.config import ModelConfig

# loss(params, batch, key, step, deterministic=False) -> (loss, metrics); metrics["count"] is the
# loss's normaliser (masked frames, sentences), so that micro-batches add up to the whole batch.
LossFn = Callable[..., tuple[Any, dict]]


class Scorer(Protocol):
  """Host-side metrics of one evaluation pass that are not means of per-batch scalars (e.g. WER)."""

  def add(self, batch: dict, outputs: dict) -> dict:
    """Takes the outputs it scores out of one batch's `outputs`; returns the per-batch scalars left."""

  def result(self) -> dict:
    """The pass's metrics, after the last batch."""


class Task(Protocol):
  kind: str  # the model's head, as init_params and checkpoints name it: "pretraining" | "ctc"
  model_config: ModelConfig  # config.model plus what the task derives (CTC: the vocabulary's size)
  whole_utterances: bool  # True: inputs are never cropped, and evaluation covers every utterance

  def validate(self, shortest_frames: int) -> None:
    """Refuses, naming the key, a config this task cannot train (before anything compiles)."""

  def labels(self, directory: str, split: str) -> Any:
    """The per-utterance targets that travel with a split's audio, or None."""

  def loss_fn(self, model_cfg: ModelConfig) -> LossFn:
    """The loss of one batch, for a model config with its kernels resolved."""

  def is_frozen(self, path: tuple[str, ...], step) -> Any:
    """Whether the parameter at `path` gets no gradient and no update at `step`: a Python bool when the
    answer does not depend on the step (no select in the program), else a traced bool."""

  def initial_params(self, key, shardings=None) -> Any:
    """The parameters of a fresh run, laid out by `shardings`: random, or config.init's (train/initial.py)."""

  def scorer(self, final: bool) -> Scorer:
    """A fresh scorer for one evaluation pass; `final` is the run's last one."""

  def train_line(self, metrics: dict) -> str:
    """The task's part of the console's training line."""

  def eval_line(self, metrics: dict) -> str:
    """The task's part of the console's evaluation line, after the loss."""

  def checkpoint_extras(self) -> dict:
    """What every checkpoint of the run carries in its config item besides the model config."""

  def health_monitor(self) -> Any:
    """The alarms (train/health.py) that watch this task's logged metrics."""


def make(config, directory: str | None = None, workdir: str | None = None) -> Task:
  """The task of `config.task` ("pretrain" or "ctc"). With the data `directory` and the run's `workdir`
  it is ready to train (CTC: the vocabulary is read or built, the beam decoder checked); without,
  it serves compiling and timing (CTC: config.model.vocab_size outputs)."""
  from w2v2_jax.train import finetune, pretrain  # pylint: disable=import-outside-toplevel

  kinds = {"pretrain": pretrain.PretrainingTask, "ctc": finetune.CtcTask}
  name = config.get("task", "pretrain")
  if name not in kinds:
    raise ValueError(f"config.task={name!r}: use one of {sorted(kinds)}")
  return kinds[name](config, directory, workdir)
