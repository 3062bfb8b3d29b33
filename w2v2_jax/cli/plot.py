"""w2v2-plot: PNGs of a run's health, written into its workdir (also at the end of every run).

  w2v2-plot --workdir=DIR [--batches=8] [--reference=experiments/base_librispeech.py]

curves.png: loss terms, accuracy, prob/code perplexity against the codebook size, lr, Gumbel
temperature and gradient norm (pre-training); CTC loss, WER/CER, lr and gradient norm (fine-tuning).
The experiment's reference curves (config.reference: published or measured values with a band) are
drawn over the run's own; --reference draws another experiment's instead.
codebook_usage.png (pre-training): how often each codeword of each group is picked (argmax, as at
inference) over a few validation batches of the latest checkpoint, sorted, with the perplexity.
A healthy run uses most codewords; a few tall bars mean codebook collapse.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from w2v2_jax import storage
from w2v2_jax.cli.common import config_flags_parser, config_key_errors, one_line_errors

FLAGS = flags.FLAGS


def define_flags():
  """Defined when the CLI runs, not on import: the library functions here can be imported together."""
  flags.DEFINE_string("workdir", None, "A w2v2-train workdir.")
  flags.DEFINE_integer("batches", 8, "Validation batches for the codebook usage histogram.")
  config_flags.DEFINE_config_file("reference", None, "An experiment config whose reference curves to draw.")


_PRETRAIN_PANELS = (
  ("loss", ("train/loss", "train/contrastive", "valid/loss", "valid/contrastive")),
  ("accuracy", ("train/accuracy", "valid/accuracy")),
  ("perplexity", ("train/prob_perplexity", "train/code_perplexity", "valid/code_perplexity")),
  ("learning rate", ("train/lr",)),
  ("Gumbel temperature", ("train/temperature",)),
  ("gradient norm", ("train/grad_norm",)),
)
_CTC_PANELS = (
  ("CTC loss", ("train/ctc_loss", "valid/loss")),
  ("error rate", ("valid/wer", "valid/cer")),
  ("learning rate", ("train/lr",)),
  ("gradient norm", ("train/grad_norm",)),
)


def _figure(rows, cols, figsize):
  """A figure and its axes grid without pyplot: no GUI backend needed, and a notebook's backend is left alone."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=figsize)
  return fig, fig.subplots(rows, cols, squeeze=False)


def curve_panels(scalars: dict, reference_curves=()) -> list[tuple[str, list[str]]]:
  """(title, tags) of each panel to draw: the task's panels with the tags the run logged or a reference
  curve draws, and a panel of its own for a reference metric no panel shows."""
  panels = _CTC_PANELS if "train/ctc_loss" in scalars else _PRETRAIN_PANELS
  drawn = {c.metric for c in reference_curves}
  homeless = sorted(drawn - {t for _, tags in panels for t in tags})
  panels = [*panels, *((metric, (metric,)) for metric in homeless)]
  panels = [(title, [t for t in tags if t in scalars or t in drawn]) for title, tags in panels]
  return [(title, tags) for title, tags in panels if tags]


def plot_curves(workdir: str, codebook_size: int | None = None, reference_curves=()) -> str:
  """WORKDIR/curves.png from the run's TensorBoard scalars, with the reference curves over them; returns its
  path."""
  from w2v2_jax.train import events  # pylint: disable=import-outside-toplevel

  scalars = events.read_scalars(workdir)
  panels = curve_panels(scalars, reference_curves)
  cols = 3 if len(panels) > 4 else 2
  rows = -(-len(panels) // cols)
  fig, axes = _figure(rows, cols, (5 * cols, 3.4 * rows))
  for ax, (title, tags) in zip(axes.flat, panels):
    for tag in tags:
      if tag in scalars:
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, ms=3, label=tag)
    for curve in reference_curves:
      if curve.metric in tags:
        _draw_reference(ax, curve)
    if title == "loss" and "train/contrastive" in scalars:
      ax.axhline(np.log(101), color="gray", ls=":", lw=1, label="chance, ln 101")
    if title == "perplexity" and codebook_size:
      ax.axhline(codebook_size, color="gray", ls=":", lw=1, label=f"codewords ({codebook_size})")
    if title in ("learning rate", "gradient norm"):
      ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("update")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis("off")
  fig.suptitle(storage.absolute(workdir), fontsize=9)
  fig.tight_layout()
  return _save(fig, storage.join(workdir, "curves.png"))


def _draw_reference(ax, curve) -> None:
  """A reference curve: its points joined by a dashed line inside its shaded band."""
  steps, values, half = (np.array(v, dtype=float) for v in zip(*curve.points))
  (line,) = ax.plot(steps, values, ls="--", marker="x", ms=4, lw=1, label=f"{curve.name} ({curve.metric})")
  ax.fill_between(steps, values - half, values + half, color=line.get_color(), alpha=0.15, lw=0)


def _save(fig, path: str) -> str:
  """The figure as a PNG at `path` (a local path or a URL, written whole)."""
  with storage.local_file(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  return path


def codebook_counts(step_dir: str, batches: int) -> tuple[np.ndarray, int]:
  """([groups, codewords] argmax counts over the frames of up to 8 utterances from each of `batches`
  validation batches, step)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel

  from w2v2_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from w2v2_jax.models.init import build  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train import checkpointing, inputs  # pylint: disable=import-outside-toplevel

  cfg, params, kind, experiment = checkpointing.load_params(step_dir)
  if kind != "pretraining":
    raise ValueError(f"{step_dir}: codebook usage needs a pre-training checkpoint (this one is {kind!r})")
  config = ml_collections.ConfigDict(experiment)
  directory = inputs.data_dir(config)
  from w2v2_jax.data import records  # pylint: disable=import-outside-toplevel

  split = (
    config.data.valid_split if records.shard_paths(directory, config.data.valid_split) else config.data.train_split
  )
  # The first few rows of each global batch, on one device: a pod-sized batch would not fit there.
  rows = (0, min(config.batch_size, 8))
  data = pipeline.AudioInput(inputs.input_config(config, directory, split, False), rows=rows)
  model = build(cfg, "pretraining")

  @jax.jit
  def codes(batch):
    audio = pipeline.waveform(batch["audio"], batch["lengths"], config.data.normalize)
    out = model.apply({"params": params}, audio, batch["lengths"], deterministic=True)
    one_hot = jax.nn.one_hot(out.quantizer.argmax_idx, cfg.num_codevectors_per_group)
    return jnp.einsum("btgv,bt->gv", one_hot, out.encoder.frame_mask.astype(jnp.float32))

  counts = np.zeros((cfg.num_codevector_groups, cfg.num_codevectors_per_group))
  for i, batch in enumerate(data):
    if i == batches:
      break
    counts += np.asarray(codes(batch))
  data.close()
  return counts, int(storage.basename(step_dir))


def plot_codebook_usage(workdir: str, batches: int = 8) -> str:
  """WORKDIR/codebook_usage.png for the latest checkpoint; returns its path."""
  from w2v2_jax.train import checkpointing  # pylint: disable=import-outside-toplevel

  step_dir = checkpointing.resolve_step_dir(workdir)
  if step_dir is None:
    raise ValueError(f"{workdir}: no checkpoint to measure codebook usage from")
  counts, step = codebook_counts(step_dir, batches)
  groups, size = counts.shape
  fig, axes = _figure(1, groups, (5 * groups, 3.2))
  for g, ax in enumerate(axes.flat):
    p = counts[g] / max(counts[g].sum(), 1)
    perplexity = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    ax.bar(np.arange(size), np.sort(p)[::-1], width=1.0)
    ax.set_title(
      f"group {g}: {int((counts[g] > 0).sum())}/{size} codewords used, perplexity {perplexity:.1f}", fontsize=9
    )
    ax.set_xlabel("codeword (sorted by use)")
    ax.set_ylabel("share of frames")
  fig.suptitle(f"codebook usage at step {step} ({int(counts[0].sum())} frames)", fontsize=9)
  fig.tight_layout()
  return _save(fig, storage.join(workdir, "codebook_usage.png"))


def write_plots(workdir: str, batches: int = 8, reference_config=None) -> list[str]:
  """Every plot that applies to this run: the curves (with the reference curves of `reference_config`, else
  of the run's own config), and codebook usage once a pre-training checkpoint exists."""
  from w2v2_jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from w2v2_jax.train import checkpointing, reference  # pylint: disable=import-outside-toplevel

  step_dir = checkpointing.resolve_step_dir(workdir)
  saved = checkpointing.load_config(step_dir) if step_dir else {}
  cfg = ModelConfig.from_dict(saved["model"]) if saved else None
  size = cfg.num_codevector_groups * cfg.num_codevectors_per_group if cfg else None
  curves = reference.curves(reference_config if reference_config is not None else saved.get("experiment", {}))
  paths = [plot_curves(workdir, size, curves)]
  if saved.get("kind") == "pretraining":
    paths.append(plot_codebook_usage(workdir, batches))
  return paths


@one_line_errors("w2v2-plot")
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.workdir:
    raise ValueError("--workdir is required")
  for path in write_plots(FLAGS.workdir, FLAGS.batches, FLAGS.reference):
    logging.info("wrote %s", path)
    print(path)


def run():
  with config_key_errors("w2v2-plot"):
    define_flags()
  app.run(main, flags_parser=config_flags_parser("w2v2-plot"))


if __name__ == "__main__":
  run()
