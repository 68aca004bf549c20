"""Start the real `logscore serve` process for tests, and talk to it over real sockets."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import grpc

from logscore.generated.logscore.v1 import scorer_pb2 as pb
from logscore.generated.logscore.v1 import scorer_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range, and not handed out before in this run
    by this process or by another pytest process of it.

    A port from bind(0) lies in the ephemeral range, where any outgoing connection (the test's,
    a sidecar's, Fluentd's) may take it before the process meant to listen there binds it: CI
    once failed on exactly that ("address already in use").
    """
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # The lower half of the room below that range: the Ruby tests, run beside these, take the upper
    # half. NOTE: scripts/test.sh runs two pytest processes (pytest-xdist), each with its own record
    # of ports handed out: each takes its own share of the lower half, or a port one had chosen and
    # not yet bound was free to the other (two processes of 150 picks each shared 1-3 ports).
    low, high = 10000, (10000 + first_ephemeral) // 2
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    share = (high - low) // workers
    candidates = range(low + worker * share, low + (worker + 1) * share) if first_ephemeral > 12000 else range(0)
    for port in random.sample(candidates, min(len(candidates), 200)):
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def models_dir_with(workdir: Path, model: Path, name: str) -> Path:
    """A models directory under workdir holding one model file, served as `name`."""
    directory = workdir / "models"
    directory.mkdir()
    shutil.copy(model, directory / f"{name}.onnx")
    return directory


class SidecarProcess:
    """``logscore serve`` in a subprocess; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, models_dir: Optional[Path], workdir: Path, ca_file: Optional[Path] = None,
                 client_cert: Optional[tuple[Path, Path]] = None, cwd: Path = ROOT, env: Optional[dict] = None,
                 **settings):
        self.workdir = workdir
        self.cwd = cwd  # where it runs (an installed copy runs from elsewhere, say)
        self.env = {**os.environ, **(env or {})}  # the test's environment with these variables changed
        self.ca_file = ca_file  # set when the sidecar serves TLS: HTTP is then HTTPS too
        self.client_cert = client_cert  # (certificate, key) when it asks for client certificates
        self.socket = str(workdir / "logscore.sock")
        self.http_port = free_port()
        # (episodes under way are the test's own: tests share model directories)
        self.settings = {"socket": self.socket, "http": f"127.0.0.1:{self.http_port}", "reload_interval_s": "0.2",
                         "episodes_file": str(workdir / "episodes.json"),
                         **({"models_dir": str(models_dir)} if models_dir is not None else {}), **settings}
        self.log_path = workdir / "sidecar.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> "SidecarProcess":
        args = [sys.executable, "-m", "logscore", "serve"]
        for name, value in self.settings.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.http_get("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.process.kill()  # not left running: a slow start on a loaded machine leaked a sidecar
        self.process.wait()
        self._log.close()
        raise RuntimeError(f"sidecar not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._log.close()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def peak_rss_bytes(self) -> int:
        """The process's peak resident memory so far (VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/PID/status")

    def metric(self, prefix: str) -> float:
        """The sum of the /metrics samples whose line starts with prefix (0 when there are none)."""
        lines = self.http_get("/metrics")[1].decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    # --- clients ----------------------------------------------------------------
    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix:{self.socket}")

    def stub(self, channel: Optional[grpc.Channel] = None) -> pb_grpc.ScorerStub:
        return pb_grpc.ScorerStub(channel or self.channel())

    def http_get(self, path: str) -> tuple[int, bytes]:
        return http_request(self.http_port, "GET", path, ca_file=self.ca_file, client_cert=self.client_cert)

    def http_post(self, path: str, body, content_type: str = "application/json",
                  headers: Optional[dict] = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, raw = http_request(self.http_port, "POST", path, data,
                                   {"Content-Type": content_type, **(headers or {})}, self.ca_file,
                                   self.client_cert)
        return status, json.loads(raw)

    def wait_for(self, condition, timeout: float = 10.0, what: str = "condition", required: bool = True):
        """The condition's first true value; its last value at the timeout when not required."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        if not required:
            return value
        raise AssertionError(f"timed out waiting for {what}; sidecar log:\n{self.log()[-3000:]}")

    def wait_for_model_checks(self, checks: int = 2, timeout: float = 30.0) -> None:
        """Until the models directory has been checked ``checks`` times more (one check may be under
        way when this is called: two make sure a whole one began after). A fixed sleep spanned no
        check at all on a loaded machine, and proved nothing."""
        done = self.metric("logscore_model_checks_total") + checks
        self.wait_for(lambda: self.metric("logscore_model_checks_total") >= done, timeout,
                      f"{checks} more checks of the models directory")

    def chunks_scored(self) -> float:
        return self.metric("logscore_batch_records_count")

    def wait_for_scoring_to_begin(self, timeout: float = 30.0, chunks_before: float = 0) -> None:
        """Until the sidecar has scored a chunk more than chunks_before (chunks_scored() when the
        call was sent): a big call sent just before is then under way.

        A fixed sleep after sending is not enough on a loaded machine: the call may not have
        reached the sidecar yet when the test signals it.
        """
        self.wait_for(lambda: self.chunks_scored() > chunks_before, timeout, "a first chunk scored")

    def model_versions(self) -> dict[str, str]:
        response = self.stub().ListModels(pb.ListModelsRequest(), timeout=5)
        return {m.name: m.version for m in response.models}


def http_request(port: int, method: str, path: str, body: Optional[bytes] = None,
                 headers: Optional[dict] = None, ca_file: Optional[Path] = None,
                 client_cert: Optional[tuple[Path, Path]] = None, timeout: float = 10) -> tuple[int, bytes]:
    scheme = "https" if ca_file else "http"
    request = urllib.request.Request(f"{scheme}://localhost:{port}{path}", data=body, method=method,
                                     headers=headers or {})
    handlers = [urllib.request.ProxyHandler({})]  # loopback only
    if ca_file:
        context = ssl.create_default_context(cafile=str(ca_file))
        if client_cert:
            context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=logscore test CA")
    for name, extension in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                            ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (directory / f"{name}.ext").write_text(extension + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: directory / name for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}

