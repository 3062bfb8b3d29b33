"""A run's data: where it lives (the offline corpus, prepared shards, or a mixture of several prepared
data dirs) and each split's input."""

from __future__ import annotations

import jax
from absl import logging

from w2v2_jax.data import mixture, pipeline


def corpus_config(config):
  """The offline corpus that config.data.corpus_* describe."""
  from w2v2_jax.demo import corpus  # pylint: disable=import-outside-toplevel

  return corpus.CorpusConfig(
    unlabeled_hours=config.data.corpus_hours,
    labeled_voices=config.data.corpus_labeled_voices,
    rooms=config.data.corpus_rooms,
  )


def sources(config) -> tuple[tuple[str, str], ...]:
  """config.data.sources as ((name, data dir), ...), checked with the mixture's other keys; () for one
  data dir. A mixture names every data dir, so data.data_dir must then be empty."""
  d = config.data
  spec = d.get("sources", "")
  if not spec:
    if d.get("source_weights", "") or d.get("sampling_alpha", 1.0) != 1.0:
      raise ValueError(
        f"config.data.source_weights={d.get('source_weights', '')!r} / config.data.sampling_alpha="
        f"{d.get('sampling_alpha', 1.0)!r} weigh a mixture, and config.data.sources is empty; name the "
        "sources (--config.data.sources=NAME=DIR,...) or leave both at their defaults"
      )
    return ()
  if d.data_dir:
    raise ValueError(
      f"config.data.sources={spec!r} and config.data.data_dir={d.data_dir!r} are both set: a mixture "
      "names every data dir in data.sources; set --config.data.data_dir= (empty), or clear data.sources"
    )
  if d.source != "shards":
    raise ValueError(
      f"config.data.sources is set with config.data.source={d.source!r}: a mixture reads prepared shards"
    )
  if config.get("task", "pretrain") != "pretrain":
    raise ValueError(
      f"config.data.sources is set for config.task={config.task!r}: mixtures are for pre-training; "
      "fine-tune on one data.data_dir"
    )
  pairs = mixture.parse_sources(spec)
  mixture.parse_weights(d.get("source_weights", ""), tuple(n for n, _ in pairs))
  mixture.check_alpha(d.get("sampling_alpha", 1.0))
  return pairs


def data_dir(config) -> str:
  """The prepared data directory: config.data.data_dir, or the offline corpus (synthesised once); for a
  mixture, its first source's (what a tool that reads one split, e.g. w2v2-plot, reads)."""
  mixed = sources(config)
  if mixed:
    return mixed[0][1]
  if config.data.source == "corpus":
    from w2v2_jax.demo import corpus  # pylint: disable=import-outside-toplevel

    return corpus.ensure_corpus(corpus_config(config), log=logging.info)
  if config.data.source != "shards" or not config.data.data_dir:
    raise ValueError(
      "config.data.source must be 'corpus', or 'shards' with config.data.data_dir set "
      f"(got source={config.data.source!r}, data_dir={config.data.data_dir!r})"
    )
  return config.data.data_dir


def input_config(config, directory: str, split: str, train: bool, whole_utterances: bool = False, mixed=()):
  """The pipeline's settings for one split; `whole_utterances` (CTC: a transcript covers all of the
  audio) never crops, and evaluates every utterance. `mixed`: the (name, dir) sources of a mixture,
  read instead of `directory` at the shares of data.sampling_alpha or data.source_weights."""
  d = config.data
  return pipeline.InputConfig(
    "" if mixed else directory,
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
    sources=tuple(mixed),
    sampling_alpha=float(d.get("sampling_alpha", 1.0)),
    source_weights=mixture.parse_weights(d.get("source_weights", ""), tuple(n for n, _ in mixed)) if mixed else (),
  )


def open_input(config, task, directory: str, split: str, train: bool, rows, mixed=()) -> pipeline.AudioInput:
  """The input of one split, with the task's per-utterance labels (if any); `mixed`: a mixture's sources."""
  cfg = input_config(config, directory, split, train, task.whole_utterances, mixed)
  data = pipeline.AudioInput(cfg, rows=rows, labels=None if mixed else task.labels(directory, split))
  if jax.process_index() == 0:
    logging.info("%s split: %s", split, data.batches.describe())
    if data.batches.mix is not None:
      logging.info("%s split: %s", split, data.batches.mix.describe())
  return data


def open_train(config, task, directory: str, rows) -> pipeline.AudioInput:
  """The training input: the train split of data.data_dir, or of every source of data.sources, mixed."""
  return open_input(config, task, directory, config.data.train_split, True, rows, sources(config))


def open_valid(config, task, directory: str, rows) -> dict[str, pipeline.AudioInput]:
  """The validation inputs (one pass each per evaluation): {"": the split} for one data dir, {name: its
  split} for each source of a mixture; a split that is unusable is left out with a warning."""
  named = sources(config) or (("", directory),)
  valid = {}
  for name, where in named:
    try:
      valid[name] = open_input(config, task, where, config.data.valid_split, False, rows)
    except ValueError as e:
      logging.warning("no validation%s: %s", f" of source {name}" if name else "", e)
  return valid
