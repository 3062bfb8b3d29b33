"""w2v2-extract: context-network features [frames, hidden] per audio file, as transformers' Wav2Vec2Model.

  w2v2-extract --checkpoint=PATH --audio=a.wav,b.flac --output=feats.npz [--layer=N]

Eval mode, no masking, no padding (group-norm models depend on padding, so each file runs at its own
length). --layer=N returns hidden_states[N] of output_hidden_states (0 = transformer input).
Normalisation follows the checkpoint's preprocessor (HF's Wav2Vec2FeatureExtractor) unless --normalize says.
"""

from __future__ import annotations

import os

from absl import app, flags

from w2v2_jax.cli.common import one_line_errors, split_list

FLAGS = flags.FLAGS


def define_flags():
  """Defined when the CLI runs, not on import: the library functions here can be imported together."""
  flags.DEFINE_string(
    "checkpoint", None, "HF directory, w2v2_jax workdir or checkpoint step folder, or a fairseq .pt file."
  )
  flags.DEFINE_string("audio", None, "Comma-separated audio files (any common format, rate, channels).")
  flags.DEFINE_string("output", None, "Output .npz, one array [frames, hidden] per file stem.")
  flags.DEFINE_integer("layer", None, "Hidden-state index (0..num_layers); default: last_hidden_state.")
  flags.DEFINE_enum(
    "normalize",
    "auto",
    ["auto", "true", "false"],
    "Zero-mean unit-variance audio first; auto: the checkpoint's preprocessor_config.json "
    "do_normalize, else true for layer-norm extractors (LV60, XLS-R).",
  )


_RESERVED = ("file", "allow_pickle")  # np.savez keyword names


def extract(cfg, params, audio_paths, layer=None, normalize=False):
  """Returns {stem: np.ndarray [frames, hidden]} for the given files."""
  import jax
  import numpy as np

  from w2v2_jax.data.audio import load_audio, normalize_waveform
  from w2v2_jax.models.init import build

  if layer is not None and not 0 <= layer <= cfg.num_hidden_layers:
    raise ValueError(f"--layer={layer} is out of range: this model has hidden states 0..{cfg.num_hidden_layers}")
  stems = [os.path.splitext(os.path.basename(p))[0] for p in audio_paths]
  dupes = sorted({s for s in stems if stems.count(s) > 1})
  if dupes:
    raise ValueError(f"--audio has several files named {dupes[0]!r} (without extension); output keys must be unique")
  reserved = [s for s in stems if s in _RESERVED]
  if reserved:
    raise ValueError(f"--audio file name {reserved[0]!r} cannot be an .npz key (reserved by numpy); rename the file")
  cfg = cfg.replace(dtype="float32")
  model = build(cfg, "model")
  bare = {"wav2vec2": params["wav2vec2"]}

  @jax.jit
  def forward(p, audio):
    out = model.apply({"params": p}, audio[None], deterministic=True)
    return out.last_hidden_state[0] if layer is None else out.hidden_states[layer][0]

  result = {}
  for stem, path in zip(stems, audio_paths):
    audio = load_audio(path)
    if normalize:
      audio = normalize_waveform(audio)
    if audio.shape[0] < cfg.receptive_field:
      raise ValueError(
        f"{path}: {audio.shape[0]} samples at 16 kHz is shorter than the model's receptive field "
        f"({cfg.receptive_field} samples)"
      )
    result[stem] = np.asarray(forward(bare, audio))
  return result


@one_line_errors("w2v2-extract")
def main(argv):
  del argv
  import numpy as np

  from w2v2_jax import storage
  from w2v2_jax.interop import fairseq
  from w2v2_jax.interop.hf import wants_normalized_audio
  from w2v2_jax.interop.load import load_pretrained, localize

  for name, value in (("checkpoint", FLAGS.checkpoint), ("audio", FLAGS.audio), ("output", FLAGS.output)):
    if not value:
      raise ValueError(f"--{name} is required")
  paths = split_list(FLAGS.audio)
  cfg, params, _ = load_pretrained(FLAGS.checkpoint)
  checkpoint = localize(FLAGS.checkpoint)
  normalize = {"true": True, "false": False}.get(FLAGS.normalize)
  if normalize is None and fairseq.is_fairseq_file(checkpoint):
    normalize = fairseq.normalize(checkpoint, cfg)
  elif normalize is None:
    normalize = wants_normalized_audio(checkpoint, cfg)
  feats = extract(cfg, params, paths, FLAGS.layer, normalize)
  output = FLAGS.output if FLAGS.output.endswith(".npz") else FLAGS.output + ".npz"
  with storage.local_file(output, suffix=".npz") as tmp:  # a local path or gs://, written whole
    np.savez(tmp, **feats)
  for stem, x in feats.items():
    print(f"{stem}: {x.shape[0]} frames x {x.shape[1]}")
  print(f"wrote {output}" + (" (normalised audio)" if normalize else ""))


def run():
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
