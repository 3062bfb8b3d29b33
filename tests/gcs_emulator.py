"""A GCS JSON API on localhost for tests and benchmarks: gcp-storage-emulator, an HTTP stub that refuses
access, and a proxy that adds latency to every request."""

from __future__ import annotations

import contextlib
import http.server
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Real GCS sends an object's generation with its media (x-goog-generation); tensorstore reads it to
# version OCDBT manifests (Orbax's checkpoints). The emulator leaves it out, so its download handler
# gains it here.
_LAUNCH = """
import sys
from gcp_storage_emulator import __main__ as cli, server
from gcp_storage_emulator.handlers import objects

original = objects.download

def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except Exception:
    pass
  return original(request, response, storage, *args, **kwargs)

objects.download = download  # objects.get calls it for ?alt=media
if "--threaded" in sys.argv:  # serve requests concurrently (benchmarks: reads only)
  sys.argv.remove("--threaded")
  import http.server
  http.server.HTTPServer = http.server.ThreadingHTTPServer
for _, handlers in server.HANDLERS:
  for method, handler in list(handlers.items()):
    if handler is original:
      handlers[method] = download
cli.main(sys.argv[1:])
"""


@contextlib.contextmanager
def emulator(bucket: str = "bkt", threaded: bool = False):
  """gcp-storage-emulator, in memory, on a free 127.0.0.1 port, with `bucket`; yields its URL. `threaded`
  serves requests concurrently (its store is not made for concurrent writes: for read benchmarks)."""
  port = free_port()
  proc = subprocess.Popen(
    [
      sys.executable,
      "-c",
      _LAUNCH,
      "start",
      "--host=127.0.0.1",
      f"--port={port}",
      "--in-memory",
      f"--default-bucket={bucket}",
      "--quiet",
    ]
    + ["--threaded"] * threaded,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
        break
      except OSError:
        if time.time() > deadline or proc.poll() is not None:
          raise RuntimeError("gcp-storage-emulator did not start") from None
        time.sleep(0.1)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=10)


def client_env(url: str) -> dict:
  """The environment that points gcsfs and tensorstore (Orbax) at the emulator."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}


@contextlib.contextmanager
def refusing_server(status: int):
  """An HTTP server answering every request with `status` (401 or 403) and a GCS-style error body."""
  body = b'{"error": {"code": %d, "message": "%s", "errors": [{"message": "%s", "reason": "%s"}]}}' % (
    status,
    *(b"Anonymous caller does not have storage.objects.get access",) * 2,
    b"forbidden" if status == 403 else b"required",
  )

  class Handler(http.server.BaseHTTPRequestHandler):
    def _refuse(self):
      length = int(self.headers.get("Content-Length") or 0)
      if length:
        self.rfile.read(length)
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def log_message(self, *args):
      del args

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def latency_proxy(target: str, delay_s: float = 0.02):
  """A TCP proxy to `target` (http://host:port) that holds each request for `delay_s` before passing it
  on (one client chunk = one request; keep-alive connections carry many, each delayed)."""
  host, port = target.split("://", 1)[1].split(":")
  listener = socket.socket()
  listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  listener.bind(("127.0.0.1", 0))
  listener.listen(512)
  stop = threading.Event()

  def pipe(src, dst, delay):
    try:
      while True:
        data = src.recv(1 << 16)
        if not data:
          break
        if delay:
          time.sleep(delay)
        dst.sendall(data)
    except OSError:
      pass
    finally:
      for s in (src, dst):
        with contextlib.suppress(OSError):
          s.shutdown(socket.SHUT_RDWR)

  def accept():
    while not stop.is_set():
      try:
        client, _ = listener.accept()
      except OSError:
        return
      upstream = socket.create_connection((host, int(port)))
      threading.Thread(target=pipe, args=(client, upstream, delay_s), daemon=True).start()
      threading.Thread(target=pipe, args=(upstream, client, 0.0), daemon=True).start()

  threading.Thread(target=accept, daemon=True).start()
  try:
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
  finally:
    stop.set()
    listener.close()
