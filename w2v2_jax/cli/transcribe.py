"""w2v2-transcribe: audio files -> one line of text per file, from a CTC checkpoint (ours or HF).

  w2v2-transcribe --checkpoint=WORKDIR_OR_HF_DIR --audio=a.wav,b.flac [--beam=0] [--kenlm=LM.arpa]

Prints `PATH<TAB>TEXT` per file. --beam=0 is greedy CTC; --beam=N uses pyctcdecode's beam search
(pip install pygtrie && pip install --no-deps pyctcdecode), with an optional KenLM n-gram model.
"""

from __future__ import annotations

from absl import app, flags

from w2v2_jax.cli.common import one_line_errors

FLAGS = flags.FLAGS


def define_flags():
  """Defined when the CLI runs, not on import: the library functions here can be imported together."""
  flags.DEFINE_string(
    "checkpoint",
    None,
    "CTC checkpoint: w2v2_jax workdir/step folder, HF directory, or a fairseq .pt file (dict.ltr.txt beside it).",
  )
  flags.DEFINE_list("audio", None, "Audio files (any format soundfile/librosa reads; resampled to 16 kHz).")
  flags.DEFINE_integer("beam", 0, "Beam width; 0 = greedy decoding.")
  flags.DEFINE_string("kenlm", None, "Optional KenLM model (.arpa/.bin) for the beam search.")


def transcribe(cfg, params, vocab, paths, normalize=False, decoder=None):
  """[(path, text)], one utterance at a time (no padding effects)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from w2v2_jax.data.audio import load_audio, normalize_waveform  # pylint: disable=import-outside-toplevel
  from w2v2_jax.decoding import ctc  # pylint: disable=import-outside-toplevel
  from w2v2_jax.models.init import build  # pylint: disable=import-outside-toplevel

  model = build(cfg, "ctc")
  forward = jax.jit(lambda p, a: model.apply({"params": p}, a)[0])
  out = []
  for path in paths:
    audio = load_audio(path)
    if audio.size < cfg.receptive_field:
      raise ValueError(f"{path}: {audio.size} samples is shorter than one frame ({cfg.receptive_field})")
    if normalize:
      audio = normalize_waveform(audio)
    logits = np.asarray(forward(params, jnp.asarray(audio[None], jnp.float32))[0])
    text = (
      decoder.decode(logits) if decoder else vocab.decode(ctc.greedy_decode(logits.argmax(-1)[None], [len(logits)])[0])
    )
    out.append((path, text))
  return out


@one_line_errors("w2v2-transcribe")
def main(argv):
  del argv
  from w2v2_jax.decoding import ctc  # pylint: disable=import-outside-toplevel
  from w2v2_jax.interop.load import load_ctc  # pylint: disable=import-outside-toplevel

  if not FLAGS.checkpoint or not FLAGS.audio:
    raise ValueError("--checkpoint and --audio are required")
  cfg, params, vocab, normalize = load_ctc(FLAGS.checkpoint)
  decoder = None
  if FLAGS.beam > 0 or FLAGS.kenlm:
    from w2v2_jax import storage  # pylint: disable=import-outside-toplevel

    kenlm = storage.local_copy(FLAGS.kenlm) if FLAGS.kenlm else None  # KenLM opens local files only
    decoder = ctc.beam_search_decoder(vocab, kenlm_path=kenlm, beam_width=max(FLAGS.beam, 1))
  for path, text in transcribe(cfg, params, vocab, FLAGS.audio, normalize, decoder):
    print(f"{path}\t{text}")


def run():
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
