#!/usr/bin/env python
"""Screenshots of TensorBoard showing the neuron-elimination trade-off, for the docs.

Steps:

1. run ``examples/mnist_lenet.py`` (small settings) into a log directory;
2. serve that directory with TensorBoard on 127.0.0.1;
3. capture, with headless Chromium, the Scalars tab filtered to ``neuron_elimination`` and the
   Images tab with the trade-off figure.

Usage, from the repository root::

    python scripts/tensorboard_screenshot.py                # writes docs/images/*.png
    python scripts/tensorboard_screenshot.py --log-dir runs/shots --keep-logs

Chromium comes from Debian's ``chromium`` package; when ``/usr/bin/chromium`` is missing and the
script runs as root, it is installed with ``apt-get``.

The browser talks to TensorBoard through a small loopback proxy that adds a script to the page: it
turns off "ignore outliers in chart scaling" (a dashboard setting kept in localStorage, not in the
URL), so that the accuracy collapse at small p stays visible, and shows the trade-off figure at its
actual size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mnist_lenet.py"
CHROMIUM = "/usr/bin/chromium"

#: The sweep curves of every target layer: accuracy and energy ratio versus p, unsmoothed.
SCALARS_FILTER = r"neuron_elimination/net.*/(accuracy|energy_ratio)$"
SCALARS_FRAGMENT = (
    f"#scalars&_smoothingWeight=0&tagFilter={urllib.parse.quote(SCALARS_FILTER, safe='')}"
)
IMAGES_FRAGMENT = "#images"

#: Runs in the page before TensorBoard's own code (see the module docstring).
PAGE_SETUP = b"""<script>
try { localStorage.setItem("_ignoreYOutliers", "false"); } catch (e) {}
(function () {
  function deepFind(root, tag) {
    const stack = [root];
    while (stack.length) {
      const node = stack.pop();
      if (node.tagName && node.tagName.toLowerCase() === tag) return node;
      if (node.shadowRoot) stack.push(node.shadowRoot);
      for (const child of node.children || []) stack.push(child);
    }
    return null;
  }
  setInterval(function () {
    const images = deepFind(document.documentElement, "tf-image-dashboard");
    if (images && !images._actualSize) images._actualSize = true;
  }, 200);
})();
</script>"""

# Loopback only: never go through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> object:
    with _OPENER.open(url, timeout=10) as response:
        return json.loads(response.read())


def find_chromium() -> str:
    found = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if found:
        return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing chromium with apt-get ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
        if os.path.exists(CHROMIUM):
            return CHROMIUM
    sys.exit("headless Chromium not found: install Debian's `chromium` package")


def run_example(args: argparse.Namespace, log_dir: Path, work: Path) -> None:
    cmd = [
        sys.executable, str(EXAMPLE), "--arch", args.arch, "--epochs", str(args.epochs),
        "--log-dir", str(log_dir), "--output", str(work / "reduced.pt"),
    ]  # fmt: skip
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def wait_for_tensorboard(proc: subprocess.Popen, base: str, timeout: float) -> None:
    """Until the server lists the callback's scalars and the trade-off image."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"TensorBoard exited with code {proc.returncode}")
        try:
            scalars = _get_json(f"{base}/data/plugin/scalars/tags")
            images = _get_json(f"{base}/data/plugin/images/tags")
            has_scalars = any(
                t.startswith("neuron_elimination/") for tags in scalars.values() for t in tags
            )
            has_image = any("neuron_elimination/tradeoff" in tags for tags in images.values())
            if has_scalars and has_image:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        time.sleep(0.5)
    sys.exit(f"TensorBoard did not serve the neuron_elimination data within {timeout:.0f}s")


def start_proxy(upstream: str) -> ThreadingHTTPServer:
    """A loopback proxy to ``upstream`` that adds :data:`PAGE_SETUP` to the HTML pages."""

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            request = urllib.request.Request(upstream + self.path, data=body, method=self.command)
            for key in ("Content-Type", "Accept", "X-XSRF-Protected"):
                if self.headers.get(key):
                    request.add_header(key, self.headers[key])
            try:
                with _OPENER.open(request, timeout=30) as response:
                    status, headers, payload = response.status, response.headers, response.read()
            except urllib.error.HTTPError as err:
                status, headers, payload = err.code, err.headers, err.read()
            content_type = headers.get("Content-Type", "")
            if content_type.startswith("text/html") and b"<head>" in payload:
                payload = payload.replace(b"<head>", b"<head>" + PAGE_SETUP, 1)
            self.send_response(status)
            for key in ("Content-Type", "Cache-Control", "Content-Encoding"):
                if headers.get(key):
                    self.send_header(key, headers[key])
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._forward()

        def do_POST(self) -> None:
            self._forward()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def screenshot(chromium: str, url: str, path: Path, args: argparse.Namespace, size: str) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={size}", f"--virtual-time-budget={args.wait_ms}",
            f"--screenshot={path}", url,
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if result.returncode != 0 or not path.is_file():
        sys.exit(f"chromium failed ({result.returncode}):\n{result.stderr[-2000:]}")
    size_kb = path.stat().st_size / 1024
    print(f"wrote {path} ({size_kb:.0f} KiB)", flush=True)
    if size_kb < 30:
        print(f"warning: {path} is small; the page may not have loaded (try --wait-ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="lenet300100", choices=["lenet300100", "lenet5"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data-dir", default=None, help="passed to the example")
    parser.add_argument("--log-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--skip-train", action="store_true", help="reuse the events in --log-dir")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--wait-ms", type=int, default=15000, help="Chromium's virtual time budget")
    parser.add_argument(
        "--load-fast", default="auto", choices=["auto", "true", "false"],
        help="TensorBoard's --load_fast (the callback logs every series with increasing steps, "
        "so both loaders serve every point)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.skip_train and not args.log_dir:
        parser.error("--skip-train needs --log-dir")

    chromium = find_chromium()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tb-screenshot-"))
    log_dir = Path(args.log_dir).resolve() if args.log_dir else work / "lightning_logs"
    tensorboard = proxy = None
    tb_log = (work / "tensorboard.log").open("w")
    try:
        if not args.skip_train:
            run_example(args, log_dir, work)
        port = _free_port()
        tensorboard = subprocess.Popen(
            [
                sys.executable, "-m", "tensorboard.main", "--logdir", log_dir.name,
                "--host", "127.0.0.1", "--port", str(port), f"--load_fast={args.load_fast}",
            ],
            cwd=log_dir.parent,  # the page shows the log dir as given: a short relative name
            stdout=subprocess.DEVNULL, stderr=tb_log,
        )  # fmt: skip
        upstream = f"http://127.0.0.1:{port}"
        wait_for_tensorboard(tensorboard, upstream, timeout=90)
        proxy = start_proxy(upstream)
        base = f"http://127.0.0.1:{proxy.server_address[1]}/"
        screenshot(
            chromium, base + SCALARS_FRAGMENT, out_dir / "tensorboard_scalars.png", args,
            size="1400,1020",
        )  # fmt: skip
        screenshot(
            chromium, base + IMAGES_FRAGMENT, out_dir / "tensorboard_tradeoff.png", args,
            size="1400,800",
        )  # fmt: skip
    finally:
        if proxy is not None:
            proxy.shutdown()
        if tensorboard is not None:
            tensorboard.terminate()
            try:
                tensorboard.wait(timeout=15)
            except subprocess.TimeoutExpired:
                tensorboard.kill()
        tb_log.close()
        if args.keep_logs:
            print(f"logs kept in {log_dir}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
