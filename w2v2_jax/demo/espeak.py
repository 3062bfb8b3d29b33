"""Offline English speech synthesis with eSpeak NG through ctypes (PyPI `espeakng-loader`).

eSpeak keeps global state that carries from one utterance to the next (its output depends on
what it said before), so each Synthesizer loads a private copy of the library: a fresh instance
says the same sequence of texts identically, whatever the process said earlier. Output is mono
int16 at the library's native rate (22,050 Hz).
"""

import _ctypes
import ctypes
import os
import shutil
import tempfile
import threading

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_LIBC = ctypes.CDLL(None)

ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = (
  "m1",
  "m2",
  "m3",
  "m4",
  "m5",
  "m6",
  "m7",
  "f1",
  "f2",
  "f3",
  "f4",
  "f5",
  "klatt",
  "klatt2",
  "klatt3",
  "croak",
  "whisper",
  "Andy",
  "Annie",
  "david",
  "edward",
  "linda",
  "max",
  "michel",
  "norbert",
  "john",
  "aunty",
  "grandpa",
)
FEMALE_VARIANTS = frozenset({"f1", "f2", "f3", "f4", "f5", "Annie", "linda", "aunty"})


class Synthesizer:
  """One eSpeak NG instance: `synth(text, voice, rate, pitch) -> int16 samples`; `close()` it."""

  def __init__(self):
    import espeakng_loader  # pylint: disable=import-outside-toplevel

    self._lock = threading.Lock()
    self._dir = tempfile.mkdtemp(prefix="w2v2-espeak-")
    private = os.path.join(self._dir, "libespeak-ng.so")
    shutil.copy(espeakng_loader.get_library_path(), private)
    self._lib = ctypes.CDLL(private)
    data = espeakng_loader.get_data_path().encode()
    self.sample_rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
    if self.sample_rate <= 0:
      raise RuntimeError(f"espeak_Initialize failed with {self.sample_rate}; is the espeakng-loader package complete?")
    self._chunks = []
    self._callback = _CALLBACK(self._collect)  # keep a reference: C holds the pointer
    self._lib.espeak_SetSynthCallback(self._callback)
    self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    self._lib.espeak_Synth.argtypes = [
      ctypes.c_char_p,
      ctypes.c_size_t,
      ctypes.c_uint,
      ctypes.c_int,
      ctypes.c_uint,
      ctypes.c_uint,
      ctypes.c_void_p,
      ctypes.c_void_p,
    ]

  def close(self):
    if self._lib is not None:
      self._lib.espeak_Terminate()
      _ctypes.dlclose(self._lib._handle)  # pylint: disable=protected-access
      self._lib = None
      shutil.rmtree(self._dir, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _collect(self, wav, num_samples, events):
    del events
    if num_samples > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0

  def synth(
    self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50, seed: int = 0
  ) -> np.ndarray:
    """Speaks `text` with `voice` (e.g. 'en-us+f3'), `rate` in words/min, pitch 0-99.

    eSpeak draws random numbers from its own generator and libc's rand(); both are seeded here.
    """
    with self._lock:
      self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
      _LIBC.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
      if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"eSpeak NG has no voice {voice!r}")
      for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
        self._lib.espeak_SetParameter(param, int(value), 0)
      self._chunks = []
      raw = text.encode() + b"\0"
      err = self._lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
      if err != 0:
        raise RuntimeError(f"espeak_Synth failed with {err} on {text!r}")
      self._lib.espeak_Synchronize()
      chunks, self._chunks = self._chunks, []
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
