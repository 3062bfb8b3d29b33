"""A run's data: where it lives (the offline corpus or prepared shards) and each split's input."""

from __future__ import annotations

import jax
from absl import logging

from w2v2_jax.data import pipeline


def corpus_config(config):
  """The offline corpus that config.data.corpus_* describe."""
  from w2v2_jax.demo import corpus  # pylint: disable=import-outside-toplevel

  return corpus.CorpusConfig(
    unlabeled_hours=config.data.corpus_hours,
    labeled_voices=config.data.corpus_labeled_voices,
    rooms=config.data.corpus_rooms,
  )


def data_dir(config) -> str:
  """The prepared data directory: config.data.data_dir, or the offline corpus (synthesised once)."""
  if config.data.source == "corpus":
    from w2v2_jax.demo import corpus  # pylint: disable=import-outside-toplevel

    return corpus.ensure_corpus(corpus_config(config), log=logging.info)
  if config.data.source != "shards" or not config.data.data_dir:
    raise ValueError(
      "config.data.source must be 'corpus', or 'shards' with config.data.data_dir set "
      f"(got source={config.data.source!r}, data_dir={config.data.data_dir!r})"
    )
  return config.data.data_dir


def input_config(config, directory: str, split: str, train: bool, whole_utterances: bool = False):
  """The pipeline's settings for one split; `whole_utterances` (CTC: a transcript covers all of the
  audio) never crops, and evaluates every utterance."""
  d = config.data
  return pipeline.InputConfig(
    directory,
    split,
    config.batch_size,
    max_sample_size=d.max_sample_size,
    min_sample_size=d.min_sample_size,
    num_buckets=d.num_buckets,
    mode=d.mode,
    bucketing=d.get("bucketing", "geometric"),  # absent in older saved configs
    shuffle=train,
    seed=config.seed,
    num_epochs=None if train else 1,
    crop_long=not whole_utterances,
    complete=not train and whole_utterances,
    read_concurrency=d.get("read_concurrency", 64),
  )


def open_input(config, task, directory: str, split: str, train: bool, rows) -> pipeline.AudioInput:
  """The input of one split, with the task's per-utterance labels (if any)."""
  cfg = input_config(config, directory, split, train, task.whole_utterances)
  data = pipeline.AudioInput(cfg, rows=rows, labels=task.labels(directory, split))
  if jax.process_index() == 0:
    logging.info("%s split: %s", split, data.batches.describe())
  return data


def open_valid(config, task, directory: str, rows):
  """The validation input (one pass per evaluation), or None with a warning if the split is unusable."""
  try:
    return open_input(config, task, directory, config.data.valid_split, False, rows)
  except ValueError as e:
    logging.warning("no validation: %s", e)
    return None
