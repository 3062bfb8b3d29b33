"""Decode any common audio file to mono 16 kHz float32, with one-line errors for bad files."""

from __future__ import annotations

import io
import os

import numpy as np

from w2v2_jax import storage

SAMPLE_RATE = 16000


class AudioError(ValueError):
  """An audio file that cannot be used; the message names the file and the reason."""


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
  """Band-limited resampling (soxr, high quality) of a mono float32 signal."""
  if rate == target:
    return audio
  import soxr

  return soxr.resample(audio, rate, target, quality="HQ").astype(np.float32)


def load_audio(path: str, target_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Read `path` (a file or a gs:// URL; wav/flac/ogg/mp3/... via soundfile, librosa as fallback), downmix,
  resample, check values."""
  if storage.is_url(path):
    try:
      source = io.BytesIO(storage.read_bytes(path))  # one GET; the decoders then seek freely
    except storage.StorageError as e:
      if str(e).endswith("no such file or object"):
        raise AudioError(f"{path}: no such file") from None
      raise
  elif not os.path.exists(path):
    raise AudioError(f"{path}: no such file")
  elif not os.path.isfile(path):
    raise AudioError(f"{path}: not a regular file")
  else:
    source = path
  try:
    import soundfile as sf

    audio, rate = sf.read(source, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
  except Exception:  # noqa: BLE001 - formats soundfile does not know go to librosa/audioread
    try:
      import librosa

      if not isinstance(source, str):
        source.seek(0)
      audio, rate = librosa.load(source, sr=None, mono=True)
    except Exception as e:  # noqa: BLE001
      detail = str(e).splitlines()[0][:160] if str(e) else "no detail"
      raise AudioError(f"{path}: unreadable audio ({type(e).__name__}: {detail})") from None
  audio = np.asarray(audio, np.float32)
  if audio.size == 0:
    raise AudioError(f"{path}: the file holds no samples")
  if not np.all(np.isfinite(audio)):
    raise AudioError(f"{path}: the audio contains NaN or Inf samples")
  return resample(audio, int(rate), target_rate)


def normalize_waveform(audio: np.ndarray) -> np.ndarray:
  """Zero mean, unit variance per utterance, as HF's feature extractor (do_normalize) does for LV60/XLS-R."""
  return ((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)).astype(np.float32)
