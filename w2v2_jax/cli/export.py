"""w2v2-export: one of our checkpoints (or an HF directory) -> an HF transformers directory.

  w2v2-export --checkpoint=WORKDIR --output=DIR [--format=hf] [--target=auto|pretraining|model|ctc]

The result loads in Wav2Vec2ForPreTraining / Wav2Vec2Model / Wav2Vec2ForCTC (by --target) with no
missing or unexpected keys.
"""

from __future__ import annotations

from absl import app, flags

from w2v2_jax.cli.common import one_line_errors

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "w2v2_jax workdir or step folder, HF directory, or fairseq .pt.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write (config.json + model.safetensors).")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf"], "Output format.")
_TARGET = flags.DEFINE_enum(
  "target",
  "auto",
  ["auto", "pretraining", "model", "ctc"],
  "HF class to write for; auto = whatever heads the checkpoint has.",
)


@one_line_errors("w2v2-export")
def main(argv):
  del argv
  from w2v2_jax.interop import hf
  from w2v2_jax.interop.load import load_pretrained

  for name, value in (("checkpoint", _CHECKPOINT.value), ("output", _OUTPUT.value)):
    if not value:
      raise ValueError(f"--{name} is required")
  import os  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel

  from w2v2_jax import storage  # pylint: disable=import-outside-toplevel

  cfg, params, kind = load_pretrained(_CHECKPOINT.value)
  target = kind if _TARGET.value == "auto" else _TARGET.value
  if storage.is_url(_OUTPUT.value):
    storage.check_writable(_OUTPUT.value)  # an unknown scheme, a missing bucket, no access: refused now
  with tempfile.TemporaryDirectory() as scratch:
    out = os.path.join(scratch, "hf") if storage.is_url(_OUTPUT.value) else _OUTPUT.value
    hf.save_hf_dir(out, cfg, params, target)
    if target == "ctc":  # the letter vocabulary, in the format of HF's Wav2Vec2CTCTokenizer
      from w2v2_jax.interop.load import load_ctc  # pylint: disable=import-outside-toplevel

      _, _, vocab, _ = load_ctc(_CHECKPOINT.value)
      vocab.save(os.path.join(out, "vocab.json"))
    if out != _OUTPUT.value:  # a bucket: each file uploaded whole
      for name in sorted(os.listdir(out)):
        storage.upload(os.path.join(out, name), storage.join(_OUTPUT.value, name))
  print(f"wrote {_OUTPUT.value} (transformers class {hf.config_to_hf(cfg, target)['architectures'][0]})")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
