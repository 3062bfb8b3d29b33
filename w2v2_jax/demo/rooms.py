"""Simulated rooms and noise for the offline corpus: reverberation and coloured noise, seeded.

eSpeak renders a word nearly the same way every time; real recordings differ by room, microphone
and background. `in_a_room` gives each utterance its own: an exponentially decaying noise impulse
response (random RT60 and direct-to-reverberant ratio), a random spectral tilt (the microphone and
the channel), and noise of random colour (white to brown) at a random SNR.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

RT60_S = (0.1, 0.8)
DIRECT_TO_REVERB_DB = (0.0, 15.0)
TILT_DB_PER_OCTAVE = (-3.0, 2.0)
NOISE_SLOPE = (0.0, 2.0)  # power ~ 1/f^slope: 0 white, 1 pink, 2 brown
SNR_DB = (5.0, 25.0)
SETTINGS = (RT60_S, DIRECT_TO_REVERB_DB, TILT_DB_PER_OCTAVE, NOISE_SLOPE, SNR_DB)  # in the corpus's hash


def _shaped_noise(n: int, slope: float, rng: np.random.Generator) -> np.ndarray:
  spectrum = np.fft.rfft(rng.standard_normal(n))
  f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
  return np.fft.irfft(spectrum * f ** (-slope / 2), n)


def _tilt(audio: np.ndarray, db_per_octave: float, sample_rate: int) -> np.ndarray:
  spectrum = np.fft.rfft(audio)
  f = np.maximum(np.fft.rfftfreq(audio.size, 1 / sample_rate), 50.0)
  return np.fft.irfft(spectrum * (f / 1000.0) ** (db_per_octave / (20 * np.log10(2))), audio.size)


def in_a_room(audio: np.ndarray, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
  """Reverberant, tilted and noisy copy of mono float `audio`, same length, peak <= 0.9."""
  rt60 = rng.uniform(*RT60_S)
  t = np.arange(int(rt60 * sample_rate)) / sample_rate
  tail = rng.standard_normal(t.size) * np.exp(-6.908 * t / rt60)  # -60 dB at rt60
  tail *= 10 ** (-rng.uniform(*DIRECT_TO_REVERB_DB) / 20) / np.sqrt(np.sum(tail**2))
  tail[0] += 1.0  # the direct path
  wet = _tilt(signal.fftconvolve(audio, tail)[: audio.size], rng.uniform(*TILT_DB_PER_OCTAVE), sample_rate)
  noise = _shaped_noise(audio.size, rng.uniform(*NOISE_SLOPE), rng)
  speech_power = np.mean(wet**2) + 1e-12
  noise *= np.sqrt(speech_power / (np.mean(noise**2) + 1e-12) / 10 ** (rng.uniform(*SNR_DB) / 10))
  out = wet + noise
  return (out * (0.9 / max(np.max(np.abs(out)), 1e-9))).astype(np.float32)
