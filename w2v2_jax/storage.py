"""Every path the project reads or writes: a local path as before, or a URL (gs://...) through fsspec.

Local paths go straight to `os` (nothing changes for them). A URL goes to the fsspec filesystem of its
scheme: gcsfs for gs://, which reaches an emulator through STORAGE_EMULATOR_HOST, and any other
installed fsspec backend (s3fs, ...). A scheme that no installed backend serves is refused.

Atomic writes: a local file is written under a temporary name, then renamed. An object store has no
rename, but an object upload is atomic: readers see the old object or the whole new one, never a
part. So every write here is one whole-object upload (`write_bytes`, `upload`), never an append.

Failures become `StorageError`, an OSError whose one-line message names the URL and what to do.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import socket
import tempfile
from collections.abc import Iterator

# Orbax reaches gs:// through etils.epath, which would send it to TensorFlow's GCS filesystem when
# TensorFlow is importable; that one has no endpoint override and is not what the rest of the
# project uses. With this, epath uses fsspec/gcsfs too: one backend for every gs:// path.
os.environ.setdefault("EPATH_USE_TF", "false")


def configure_emulator() -> None:
  """With STORAGE_EMULATOR_HOST (a local GCS emulator, which has no auth), every gs:// client goes there
  unauthenticated: gcsfs (ours and Orbax's), and tensorstore through TENSORSTORE_GCS_HTTP_URL."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if not host:
    return
  os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
  try:
    import fsspec.config  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  fsspec.config.conf.setdefault("gs", {}).setdefault("token", "anon")


configure_emulator()

GCS_INSTALL = "pip install 'w2v2-jax[gcs]'"


class StorageError(OSError):
  """A path that cannot be read or written; the message names it and says what to do."""


def is_url(path: str) -> bool:
  return "://" in str(path)


def scheme(path: str) -> str:
  return str(path).split("://", 1)[0] if is_url(path) else ""


def join(base: str, *parts: str) -> str:
  if is_url(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def basename(path: str) -> str:
  return posixpath.basename(str(path).rstrip("/")) if is_url(path) else os.path.basename(path)


def dirname(path: str) -> str:
  return posixpath.dirname(str(path).rstrip("/")) if is_url(path) else os.path.dirname(path)


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is (os.path.abspath would turn gs://b into ./gs:/b)."""
  return str(path) if is_url(path) else os.path.abspath(path)


@functools.cache
def _filesystem(protocol: str):
  import fsspec  # pylint: disable=import-outside-toplevel

  key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
  if protocol in ("gs", "gcs") and key_file and not os.path.isfile(key_file):
    # google-auth would reject it and gcsfs would quietly go on unauthenticated
    raise StorageError(
      f"GOOGLE_APPLICATION_CREDENTIALS={key_file}: no such key file; point it at a service "
      "account key, or unset it to use the VM's service account"
    )
  try:
    cls = fsspec.get_filesystem_class(protocol)
  except ValueError:
    raise StorageError(f"{protocol}://: no storage backend knows this URL scheme; use a local path or gs://") from None
  except ImportError:
    hint = GCS_INSTALL if protocol in ("gs", "gcs") else f"install the fsspec backend for {protocol}://"
    raise StorageError(f"{protocol}:// paths need their fsspec backend: {hint}") from None
  import logging  # pylint: disable=import-outside-toplevel

  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # it logs each refused request with a traceback;
  return cls()  # errors_name() reports it in one line


def filesystem(url: str):
  """The fsspec filesystem that serves `url` (checked: an unknown scheme raises StorageError)."""
  return _filesystem(scheme(url))


def _strip(url: str) -> str:
  return str(url).split("://", 1)[1]


@contextlib.contextmanager
def errors_name(url: str, action: str = "read") -> Iterator[None]:
  """Turns a backend's exceptions into one StorageError line naming `url`."""
  try:
    yield
  except StorageError:
    raise
  except Exception as e:  # noqa: BLE001 - gcsfs, google-auth and aiohttp raise many types
    raise _as_storage_error(url, action, e) from None


def _as_storage_error(url: str, action: str, e: Exception) -> Exception:
  text = " ".join(str(e).split())[:200] or type(e).__name__
  code = getattr(e, "code", None) or getattr(e, "status", None)
  if code is None:  # gcsfs raises some refusals as a plain OSError("Forbidden: ...")
    code = {"Forbidden": 403, "Unauthorized": 401}.get(text.split(":", 1)[0])
  kind = type(e).__name__
  if "DefaultCredentialsError" in kind or "RefreshError" in kind or "credentials" in text.lower() and code is None:
    return StorageError(
      f"{url}: no usable cloud credentials ({text}); on a TPU/GCE VM its service account is used, "
      "elsewhere run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS "
      "to a key file"
    )
  if code == 401:
    return StorageError(
      f"{url}: not authenticated (HTTP 401); check the credentials "
      "(gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS)"
    )
  if code == 403 or isinstance(e, PermissionError):
    return StorageError(
      f"{url}: permission denied (HTTP 403) to {action} it; grant this account access to the bucket "
      "(e.g. roles/storage.objectAdmin)"
    )
  if code == 404 or isinstance(e, FileNotFoundError):
    bucket = url.split("://", 1)[0] + "://" + _strip(url).split("/", 1)[0]
    if _bucket_missing(url):
      return StorageError(f"{url}: no such bucket {bucket}; create it or fix the path")
    return StorageError(f"{url}: no such file or object")
  if isinstance(e, (ValueError, OSError, TimeoutError)) or code is not None:
    return StorageError(f"{url}: cannot {action} it ({kind}: {text})")
  return e


def _bucket_missing(url: str) -> bool:
  try:
    return not filesystem(url).exists(_strip(url).split("/", 1)[0])
  except Exception:  # noqa: BLE001 - asked only to word an error
    return False


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  with errors_name(path):
    return filesystem(path).exists(_strip(path))


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(path)
  with errors_name(path):
    return filesystem(path).isdir(_strip(path))


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  with errors_name(path):
    return filesystem(path).isfile(_strip(path))


def listdir(path: str) -> list[str]:
  """Names in a folder (an object store's prefix), like os.listdir."""
  if not is_url(path):
    return os.listdir(path)
  with errors_name(path):
    entries = filesystem(path).ls(_strip(path), detail=False)
  return sorted({posixpath.basename(e.rstrip("/")) for e in entries})


def glob(directory: str, pattern: str) -> list[str]:
  """Sorted paths in `directory` whose names match the glob `pattern` (URLs come back as URLs)."""
  if not is_url(directory):
    import glob as glob_lib  # pylint: disable=import-outside-toplevel

    return sorted(glob_lib.glob(os.path.join(glob_lib.escape(directory), pattern)))
  prefix = scheme(directory) + "://"
  with errors_name(directory):
    return sorted(prefix + p for p in filesystem(directory).glob(_strip(join(directory, pattern))))


def find(root: str) -> list[str]:
  """Every file under `root`, recursively, sorted (URLs come back as URLs)."""
  if not is_url(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
  prefix = scheme(root) + "://"
  with errors_name(root):
    return sorted(prefix + p for p in filesystem(root).find(_strip(root)))


def makedirs(path: str) -> None:
  """A local folder (and parents); nothing on an object store, where folders are only name prefixes."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if not is_url(path):
    os.remove(path)
    return
  with errors_name(path, "delete"):
    filesystem(path).rm_file(_strip(path))


def size(path: str) -> int:
  if not is_url(path):
    return os.path.getsize(path)
  with errors_name(path):
    return int(filesystem(path).size(_strip(path)))


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
  """The whole file, or bytes [start, end): one ranged GET on an object store."""
  if not is_url(path):
    with open(path, "rb") as f:
      if start is not None:
        f.seek(start)
        return f.read(end - start if end is not None else -1)
      return f.read()
  with errors_name(path):
    return filesystem(path).cat_file(_strip(path), start=start, end=end)


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path: str):
  return json.loads(read_bytes(path))


def write_bytes(path: str, data: bytes) -> None:
  """Atomically: a local temporary file renamed into place, or one whole-object upload."""
  if not is_url(path):
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise
    return
  with errors_name(path, "write"):
    filesystem(path).pipe_file(_strip(path), data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj, **kwargs) -> None:
  write_text(path, json.dumps(obj, **kwargs))


def upload(local_path: str, path: str, keep_local: bool = False) -> None:
  """Moves a finished local file to `path` (a URL: one whole-object upload, the local file kept if asked;
  a local path: a rename, or a copy across filesystems)."""
  if not is_url(path):
    if keep_local:
      import shutil  # pylint: disable=import-outside-toplevel

      shutil.copyfile(local_path, path + ".tmp")
      os.replace(path + ".tmp", path)
      return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
      os.replace(local_path, path)
    except OSError:  # another filesystem
      import shutil  # pylint: disable=import-outside-toplevel

      shutil.copyfile(local_path, path + ".tmp")
      os.replace(path + ".tmp", path)
    return
  with errors_name(path, "write"):
    filesystem(path).put_file(local_path, _strip(path))


def local_path(path: str) -> str:
  """Where a library that only writes local files should write `path`: itself, or for a URL a fixed
  place in the temporary folder (upload it from there)."""
  if not is_url(path):
    return path
  digest = hashlib.sha256(dirname(path).encode()).hexdigest()[:16]  # one local folder per URL folder
  return os.path.join(tempfile.gettempdir(), "w2v2_jax_storage", digest, basename(path))


def local_copy(path: str) -> str:
  """A local file with `path`'s content, for libraries that open local files only (KenLM): the path
  itself, or a URL downloaded once per process into the temporary folder."""
  if not is_url(path):
    return path
  target = local_path(path)
  if not os.path.exists(target):
    data = read_bytes(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + f".{os.getpid()}", "wb") as f:
      f.write(data)
    os.replace(target + f".{os.getpid()}", target)
  return target


@contextlib.contextmanager
def local_file(path: str, suffix: str = "") -> Iterator[str]:
  """A local path to write `path`'s content at; on a clean exit it lands at `path` in one step.

  Libraries that write files themselves (TFRecord writers, matplotlib, safetensors) write here.
  """
  if not is_url(path):
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
  else:
    filesystem(path)  # an unknown scheme fails before any work
    fd, tmp = tempfile.mkstemp(suffix=suffix or os.path.splitext(basename(path))[1])
  os.close(fd)
  try:
    yield tmp
    upload(tmp, path)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def check_writable(path: str) -> None:
  """Fails at once, with one line, if a run could not write under `path` (missing bucket, no access)."""
  if not is_url(path):
    return
  # one probe object per process: the hosts of a pod check the same workdir at once
  probe = join(path, f".w2v2_write_check.{socket.gethostname()}.{os.getpid()}")
  try:
    write_bytes(probe, b"")
    remove(probe)
  except StorageError as e:
    raise StorageError(str(e).replace(probe, path)) from None
