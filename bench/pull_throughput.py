"""Pull + verify throughput of a large release over loopback, as a ratio to curl.

Both fetch the same file from the same registry server (a separate process) in the
same run, alternating, so machine noise hits both alike. The agent's figure covers
the whole pull: manifest, signature, download with hashing, length and hash checks,
fsync, rename and the atomic activation. curl only writes the file (no fsync), so
the ratio is strict against us. The same pull as an `edge-agent models pull` process
(start-up and imports included, as curl's are) is printed beside it. Then a transfer
is cut at half way once, and the bytes the registry sent beyond the file's size are
the bytes fetched again.

    python bench/pull_throughput.py [--mb 100 [1000 ...]] [--runs 5] [--dir FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import parse_config  # noqa: E402
from agent.fleet.publish import publish  # noqa: E402
from agent.pull import Updater  # noqa: E402
from agent.registry import Registry  # noqa: E402
from agent.store import Store  # noqa: E402
from agent.verify import generate_keypair  # noqa: E402

MODEL = "bench-model"


class Server:
    def __init__(self, registry: Path, *faults: str) -> None:
        args = [sys.executable, "-m", "tests.registry_server", "--root", str(registry)]
        for fault in faults:
            args += ["--fault", fault]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()

    def stop(self) -> list[dict[str, object]]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def config_text(url: str, work: Path, pub: Path) -> str:
    return (
        f"registry: {{url: '{url}', public_key: '{pub}', max_download_mb: 2000}}\n"
        f"model: {{name: {MODEL}}}\nstore: {{dir: '{work / 'store'}', reserve_mb: 0}}\n"
    )


def agent_pull(url: str, work: Path, pub: Path) -> tuple[float, int]:
    store_dir = work / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    config = parse_config(config_text(url, work, pub), env={})
    store = Store(store_dir).open()
    registry = Registry.from_config(config.registry)
    started = time.perf_counter()
    result = Updater(config, store, registry).pull()
    elapsed = time.perf_counter() - started
    registry.close()
    return elapsed, result.release.manifest.total_size


def cli_pull(url: str, work: Path, pub: Path) -> float:
    """``edge-agent models pull`` as a process, like curl: start-up and imports count."""
    shutil.rmtree(work / "store", ignore_errors=True)
    config = work / "agent.yaml"
    config.write_text(config_text(url, work, pub))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["PYTHONPATH"] = str(ROOT)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "agent.cli", "models", "pull", "--config", str(config), "--json"],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def curl_fetch(url: str, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["curl", "-sS", "--fail", "-o", str(out), url + f"{MODEL}/1/model.tflite"], check=True
    )
    elapsed = time.perf_counter() - started
    if out.is_file():
        out.unlink()
    return elapsed


def bench_size(work: Path, mb: int, runs: int) -> float:
    """Publish a release of ``mb`` MB in ``work`` and print its figures; returns the ratio."""
    key, pub = generate_keypair(work / "keys")
    model = work / "model.tflite"
    data = bytearray(os.urandom(mb * 1_000_000))
    data[4:8] = b"TFL3"
    model.write_bytes(data)
    del data
    publish(
        [model],
        model=MODEL,
        version=1,
        registry=work / "registry",
        sign_key=key,
        channels=("stable",),
    )
    model.unlink()  # the registry holds its own copy

    server = Server(work / "registry")
    curl_times, agent_times, wire_times, cli_times = [], [], [], []
    size = 0
    for _ in range(runs):
        wire_times.append(curl_fetch(server.url, Path(os.devnull)))
        curl_times.append(curl_fetch(server.url, work / "curl.out"))
        elapsed, size = agent_pull(server.url, work, pub)
        agent_times.append(elapsed)
        cli_times.append(cli_pull(server.url, work, pub))
    server.stop()
    curl_s, agent_s = statistics.median(curl_times), statistics.median(agent_times)
    wire_s, cli_s = statistics.median(wire_times), statistics.median(cli_times)
    goal = 0.8 if mb < 1000 else 0.9
    print(f"release: {size / 1e6:.0f} MB, {runs} runs each, medians")
    print(
        f"curl to /dev/null (server + loopback ceiling): {wire_s:6.3f} s  "
        f"{size / wire_s / 1e6:7.1f} MB/s"
    )
    print(f"curl (download only):            {curl_s:6.3f} s  {size / curl_s / 1e6:7.1f} MB/s")
    print(f"edge-agent pull (+verify, fsync): {agent_s:6.3f} s  {size / agent_s / 1e6:7.1f} MB/s")
    print(
        f"`edge-agent models pull` process:  {cli_s:6.3f} s  {size / cli_s / 1e6:7.1f} MB/s  "
        f"(ratio to curl {curl_s / cli_s:.2f}: + start-up and imports)"
    )
    each = ", ".join(f"{c / a:.2f}" for c, a in zip(curl_times, agent_times, strict=True))
    print(
        f"throughput ratio agent / curl:    {curl_s / agent_s:.2f}  (goal >= {goal}; "
        f"each run: {each})"
    )

    half = size // 2
    cut = Server(work / "registry", f"{MODEL}/1/model.tflite:truncate:{half}")
    agent_pull(cut.url, work, pub)
    log = [r for r in cut.stop() if str(r["path"]).endswith("model.tflite")]
    sent = sum(int(str(r["sent"])) for r in log)
    ranges = [r["range_start"] for r in log]
    print(
        f"cut at {half / 1e6:.0f} MB: {len(log)} requests (Range starts {ranges}), "
        f"{sent - size} bytes fetched again"
    )
    return curl_s / agent_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[100], help="release sizes")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: TMPDIR)")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is needed for the baseline: apt-get install curl")
    for mb in args.mb:
        with tempfile.TemporaryDirectory(prefix="edge-bench-", dir=args.dir) as tmp:
            # the registry's copy, curl's copy and the store's copy (+ a partial file)
            need = 4 * mb * 1_000_000
            free = shutil.disk_usage(tmp).free
            if free < need:
                sys.exit(
                    f"{tmp}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed for "
                    f"--mb {mb}; pass --dir on a disk with room"
                )
            bench_size(Path(tmp), mb, args.runs)


if __name__ == "__main__":
    main()
