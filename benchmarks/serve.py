r"""The server under load on localhost: batched against one request at a time; prints a table.

  python -m benchmarks.serve --workdir=workdirs/tiny

Starts `python -m cm3jax.serve` on 127.0.0.1 twice, with --max_batch=BATCH and with
--max_batch=1 (other flags at their defaults: a queue of 64), and on each runs closed-loop clients (each sends its next request when its last
is answered) for --seconds or --max_requests, whichever ends first, at each count of --clients.
A request draws one image of a shapes caption (--rerank=1, the run's guidance and top-p), seed
by request. Rows: images/s, p50 and p95 latency, errors (anything but 200) and answered out of
sent. Then --soak_seconds at --soak_clients on the batched server, and --burst clients sent at
once (503s expected) followed by a health check. The server's peak memory is its VmHWM.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/tiny", "A trained run.")
_CLIENTS = flags.DEFINE_list("clients", ["1", "8", "16", "32"], "Concurrent clients per row.")
_BATCH = flags.DEFINE_integer("max_batch", 16, "The batched server's --max_batch.")
_WAIT = flags.DEFINE_float("max_wait_ms", 5.0, "The batched server's --max_wait_ms.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Longest a row runs.")
_MAX_REQUESTS = flags.DEFINE_integer("max_requests", 2000, "Most requests a row sends.")
_SOAK_SECONDS = flags.DEFINE_float("soak_seconds", 120.0, "The soak's length; 0: none.")
_SOAK_CLIENTS = flags.DEFINE_integer("soak_clients", 16, "Clients during the soak.")
_BURST = flags.DEFINE_integer("burst", 200, "Clients sent at once at the end; 0: none.")

CAPTIONS = ["a red circle above a blue square", "a small green triangle at the top",
            "a large blue square on the left", "a yellow circle below a red triangle"]


def start(workdir: str, *server_flags: str) -> tuple[subprocess.Popen, str]:
  server = subprocess.Popen([sys.executable, "-m", "cm3jax.serve", f"--workdir={workdir}",
                             "--port=0", *server_flags], stdout=subprocess.PIPE, text=True)
  for line in server.stdout:
    if line.startswith("serving "):
      return server, line.split(" on ")[1].strip()
  raise SystemExit(f"the server did not start: exit {server.wait()}")


def peak_memory_mb(pid: int) -> float:
  with open(f"/proc/{pid}/status") as status:  # local file: this machine's process table
    for line in status:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def request(address: str, seed: int, timeout: float = 300.0) -> tuple[int, float]:
  """(HTTP status, seconds) of one text->image request; status 0: no answer."""
  body = json.dumps({"captions": [CAPTIONS[seed % len(CAPTIONS)]], "num_images": 1,
                     "rerank": 1, "seed": seed}).encode()
  sent = urllib.request.Request(f"{address}/v1/text_to_image", body,
                                {"Content-Type": "application/json"}, method="POST")
  start_s = time.perf_counter()
  try:
    with urllib.request.urlopen(sent, timeout=timeout) as answer:
      answer.read()
      status = answer.status
  except urllib.error.HTTPError as e:
    status = e.code
  except OSError:
    status = 0
  return status, time.perf_counter() - start_s


def load(address: str, clients: int, seconds: float, max_requests: int) -> dict:
  """Closed-loop clients until `seconds` pass or `max_requests` are sent."""
  lock, results, sent = threading.Lock(), [], [0]
  deadline = time.perf_counter() + seconds

  def client():
    while time.perf_counter() < deadline:
      with lock:
        if sent[0] >= max_requests:
          return
        sent[0] += 1
        seed = sent[0]
      outcome = request(address, seed)
      with lock:
        results.append(outcome)

  start_s = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.perf_counter() - start_s
  ok = [s for status, s in results if status == 200]
  return {"clients": clients, "sent": sent[0], "answered": len(results), "ok": len(ok),
          "errors": len(results) - len(ok), "images_per_s": len(ok) / elapsed,
          "p50_s": float(np.percentile(ok, 50)) if ok else float("nan"),
          "p95_s": float(np.percentile(ok, 95)) if ok else float("nan")}


def burst(address: str, clients: int) -> dict:
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    statuses = [s for s, _ in pool.map(lambda i: request(address, i), range(clients))]
  with urllib.request.urlopen(f"{address}/health", timeout=60) as answer:
    healthy = json.load(answer)["status"] == "ok"
  return {"200": statuses.count(200), "503": statuses.count(503),
          "other": len(statuses) - statuses.count(200) - statuses.count(503), "healthy": healthy}


def row(server: str, r: dict) -> str:
  return (f"| {server} | {r['clients']} | {r['images_per_s']:.2f} | {1000 * r['p50_s']:.0f} | "
          f"{1000 * r['p95_s']:.0f} | {r['errors']} | {r['answered']} / {r['sent']} |")


def main(_):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  lines = ["| server | clients | images/s | p50 ms | p95 ms | errors | answered / sent |",
           "|---|---|---|---|---|---|---|"]
  extra, peaks = [], {}
  for batch in (_BATCH.value, 1):
    name = f"--max_batch={batch}"
    server, address = start(_WORKDIR.value, f"--max_batch={batch}",
                            f"--max_wait_ms={_WAIT.value if batch > 1 else 0}")
    try:
      for clients in map(int, _CLIENTS.value):
        lines.append(row(name, load(address, clients, _SECONDS.value, _MAX_REQUESTS.value)))
        print(lines[-1], flush=True)
      if batch > 1 and _SOAK_SECONDS.value:
        soak = load(address, _SOAK_CLIENTS.value, _SOAK_SECONDS.value, 10**9)
        extra.append(f"soak, {name}, {_SOAK_CLIENTS.value} clients for "
                     f"{_SOAK_SECONDS.value:.0f} s: {soak['ok']} images, {soak['errors']} errors, "
                     f"{soak['answered']} answered of {soak['sent']} sent, "
                     f"p95 {1000 * soak['p95_s']:.0f} ms")
      if batch > 1 and _BURST.value:
        b = burst(address, _BURST.value)
        extra.append(f"burst, {name}, {_BURST.value} clients at once: {b['200']} answered 200, "
                     f"{b['503']} refused 503, {b['other']} other; health afterwards "
                     f"{'ok' if b['healthy'] else 'FAILED'}; server alive: {server.poll() is None}")
      peaks[name] = peak_memory_mb(server.pid)
    finally:
      server.terminate()
      server.wait(120)
  print("\n".join(lines))
  for line in extra:
    print(f"- {line}")
  print("- server peak memory (VmHWM): " + ", ".join(f"{n}: {mb:.0f} MB"
                                                     for n, mb in peaks.items()))


if __name__ == "__main__":
  app.run(main)
