"""`logscore serve`: the sidecar process.

Loads every model of the models directory, serves gRPC on a Unix socket and/or
TCP (TLS, mutual TLS, bearer token), HTTP for metrics/health/JSON scoring,
reloads models on change or SIGHUP, and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import time
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .behaviour import Behaviour
from .errors import ConfigError, ModelNotFound
from .events import EventHub
from .generated.logscore.v1 import scorer_pb2
from .metrics import Metrics
from .registry import UNLOAD_GRACE_S, ModelRegistry
from .scoring import ScoringService, not_ready_reason
from .servers.forward import ForwardServer, NextHop
from .servers.grpc import SERVICE_NAME, CallLimitInterceptor, ConnectionWatch, ScorerServicer, TokenInterceptor
from .servers.http import SCORING_PATHS, HttpServer, SidecarHttp
from .settings import Settings, split_host_port, unknown_variables
from .timestamps import read_zoneless_in, zone_description

log = logging.getLogger("logscore.serve")

# How often gRPC health is brought in line with /readyz (Sidecar.follow_readiness)
READINESS_CHECK_S = 1.0

# Streams one gRPC connection may open at once. NOTE: gRPC's transport takes in a stream's data
# before any of our code sees the call (the cap's interceptor included), so this is what bounds the
# memory one connection holds: 256 a connection let one client with 4 connections of 256 calls hold
# 1.4 GiB (8: 236 MiB). A client reaching it has calls refused anonymously (REFUSED_STREAM, which
# grpc's clients report as UNAVAILABLE and do not retry), as a stream its client has seen answered
# still counts here for a while: at 8, a client of 8 threads on one connection had 22 % of its
# Score calls refused. So twice what a client should keep open on one connection (8; the Fluentd
# filter keeps 4).
STREAMS_PER_CONNECTION = 16


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any extra fields."""

    RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in self.RESERVED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def tune_allocator() -> None:
    """Fewer glibc malloc arenas and no mmap churn for numpy's batch arrays.

    NOTE: glibc's defaults cost ~5 page faults per record on big batches
    (docs/performance.md); mallopt applies to later allocations, so no
    environment variables or re-exec are needed. A no-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_arena_max, 2)
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        libc.mallopt(m_trim_threshold, 64 * 1024 * 1024)
    except (OSError, AttributeError):
        pass


# When Python's garbage collector runs its youngest generation: once this many more objects it
# tracks (lists, dicts, tuples) have been made than freed since its last run. A record decoded from
# msgpack (forward mode, the Fluentd filter's event streams) is two or three of them (a list, a
# dict, forward mode's EventTime), alive until its batch is answered: at Python's 700 the collector
# ran four times a 1,000-record forward chunk and moved the records it found on to the older
# generations, which it walks whole (4.9 % of the sidecar's samples behind Fluent Bit). Records go
# by their reference counts anyway; only cycles wait for the collector.
YOUNG_GENERATION_THRESHOLD = 20_000


def tune_collector() -> None:
    """Run the garbage collector's youngest generation less often (YOUNG_GENERATION_THRESHOLD).

    NOTE: measured behind real Fluent Bit (forward mode, 400,000 lines, three alternating pairs):
    the sidecar's CPU 7-19 % lower; behind Fluentd's filter and in Model.score, within the noise."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


class DrainingHealth(health.aio.HealthServicer):
    """grpc's health servicer (its Check) with a Watch that ends at shutdown, once it has said NOT_SERVING.

    NOTE: grpc's Watch ends only when its client cancels it, and the gRPC server's stop waits for
    every call: one open Watch (gRPC client-side health checking keeps one per connection) held the
    stop for all of shutdown_grace_s (10 s idle, in a test). Cancelling grpc's own Watch instead
    broke the call when it was cut mid-write (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), so Watch is
    this class's, over the statuses it is given."""

    def __init__(self):
        super().__init__()
        self._statuses = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Condition()
        self._draining = False

    async def set(self, service: str, status) -> None:
        await super().set(service, status)
        if not self._draining:
            async with self._changed:
                self._statuses[service] = status
                self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        async with self._changed:
            self._draining = True
            self._changed.notify_all()

    async def Watch(self, request, context):
        """Each change of the service's status, written outside the lock.
        NOTE: written under it, a client not reading (its write blocked) would block set() and
        enter_graceful_shutdown(), and so the sidecar's stop (review, session 27)."""
        said = None
        while True:
            async with self._changed:
                while (status := self._status(request.service)) == said and not self._draining:
                    await self._changed.wait()
                draining = self._draining
            if status != said:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                said = status
            if draining:
                return

    def _status(self, service: str):
        if self._draining:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return self._statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)


class Sidecar:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.stopping = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.hangup = False  # a SIGHUP came since the last check: rejected files are tried again
        self.follow_up_pending = False  # a reload changed the models and what follows has not run through yet
        self.check_failure: Optional[tuple[str, str]] = None  # the model check's failure as last logged
        self.registry = ModelRegistry(settings.models_dir, settings.default_model, settings.tag_routes,
                                      settings.entity_field, self._model_event, settings.max_record_bytes,
                                      settings.entity_key,
                                      unload_grace_s=UNLOAD_GRACE_S if settings.reload_interval_s else 0.0,
                                      max_model_bytes=settings.max_model_bytes)
        self.learner = make_learner(settings, self.registry, self.reload_requested.set, self.metrics)
        self.review = make_review(settings, self.metrics)
        self.feedback = make_feedback(settings, self.registry, self.review, self.metrics)
        self.hub = EventHub(settings.anomaly_recent, settings.anomaly_watcher_queue,
                            on_drop=self.metrics.anomaly_events_dropped.inc)
        read_zoneless_in(settings.time_zone)  # the records' own times, for windows and clients
        self.behaviour = Behaviour(settings, self.hub, self.metrics)
        self.service = ScoringService(self.registry, settings, self.metrics, self.learner, self.feedback, self.review,
                                      self.behaviour)
        self.health = DrainingHealth()
        self.grpc_server: Optional[grpc.aio.Server] = None
        self.scorer: Optional[ScorerServicer] = None
        self.http_server: Optional[HttpServer] = None
        self.forward_server: Optional[ForwardServer] = None
        self.bound: dict[str, str] = {}
        self.socket_identity: Optional[tuple[int, int]] = None  # (device, inode) of the socket we made
        self._no_default_warned: Optional[str] = None  # why no model is the default, as last warned
        self._unloaded_routes_warned: dict[str, str] = {}  # tag routes to no loaded model, as last warned

    def _model_event(self, event: str, name: str, detail: str) -> None:
        if event == "rejected":
            log.error("model file rejected; the previous version (if any) keeps serving",
                      extra={"model": name, "error": detail})
            self.metrics.model_rejections.labels(name).inc()
        else:
            log.info(f"model {event}", extra={"model": name, "detail": detail})

    async def start(self) -> None:
        s = self.settings
        self._check_listeners()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.registry.reload)
        if not self.registry.snapshot.models:
            problems = "; ".join(self.registry.snapshot.errors.values()) or "no .onnx files"
            raise ConfigError(f"no model could be loaded from {s.models_dir}: {problems}")
        self._check_default_model()
        self._warn_unloaded_routes()
        self._warn_when_no_default()
        await loop.run_in_executor(None, self.service.start_processes)
        self.metrics.set_models(self.registry.snapshot.models)
        await loop.run_in_executor(None, self.feedback.start)
        self.hub.attach(loop)
        self.behaviour.follow(self.registry.snapshot.models.values())
        await self._start_grpc()
        if s.http:
            host, port = split_host_port(s.http, "--http")
            surface = SidecarHttp(self.service, s.token(), host)
            self.http_server = HttpServer(surface.routes(), s.max_message_bytes, self.service.admission,
                                          self.service.metrics, s.max_connections, surface.gate,
                                          scoring_paths=SCORING_PATHS, content_checks=surface.content_checks())
            await listening(self.http_server.start(host, port, ssl=self._http_ssl()), "--http", s.http)
            self.bound["http"] = f"{host}:{self.http_server.port}"
        if s.forward:
            host, port = split_host_port(s.forward, "--forward")
            self.forward_server = ForwardServer(self.service, NextHop(s.forward_to, s.forward_ack_timeout_s),
                                                s.forward_max_message_bytes, s.forward_idle_timeout_s,
                                                s.forward_when_busy, s.forward_events_tag, s.max_connections,
                                                s.forward_explain)
            await listening(self.forward_server.start(host, port), "--forward", s.forward)
            self.bound["forward"] = f"{host}:{self.forward_server.port}"
        await self._set_health(not_ready_reason(self.service) is None)
        log.info("serving", extra={"listeners": self.bound, "models": sorted(self.registry.snapshot.models),
                                   "times_without_zone_in": zone_description(self.settings.time_zone)})
        notify_systemd(b"READY=1")

    def _check_listeners(self) -> None:
        """Refuse, before loading anything, to start where another process serves."""
        s = self.settings
        if s.socket:
            claim_socket(s.socket)
        for flag, address in (("--tcp", s.tcp), ("--http", s.http), ("--forward", s.forward)):
            if address:
                check_port_free(address, flag)

    def _check_default_model(self) -> None:
        name = self.settings.default_model
        models = self.registry.snapshot.models
        if name and name not in models:
            raise ConfigError(f"--default-model {name}: no such model in {self.settings.models_dir} "
                              f"(loaded: {', '.join(sorted(models))}); name one of them or add {name}.onnx")

    def _warn_unloaded_routes(self) -> None:
        """A tag route naming a model that is not loaded (a typo, a file not copied yet, its file removed
        since): its records are refused NOT_FOUND (shippers pass them unscored), and nothing said so until
        they came. At start and at each reload, once per change; /readyz lists them (`unloaded_routes`).
        NOTE: a warning, not a refusal: the model may arrive later through hot reload."""
        models = self.registry.snapshot.models
        unloaded = self.registry.unloaded_routes()
        for pattern, name in self._unloaded_routes_warned.items():
            if pattern not in unloaded:
                log.info("tag route's model is loaded again", extra={"route": pattern, "model": name})
        for pattern, name in unloaded.items():
            if self._unloaded_routes_warned.get(pattern) != name:
                log.warning("tag route to a model that is not loaded: records with such tags are refused "
                            "(NOT_FOUND; shippers pass them unscored) until it is; fix the route or add the model",
                            extra={"route": pattern, "model": name, "detail": f"add {name}.onnx to "
                                   f"{self.settings.models_dir}; loaded: {', '.join(sorted(models))}"})
        self._unloaded_routes_warned = unloaded

    async def follow_readiness(self) -> None:
        """gRPC health says what /readyz says, checked every READINESS_CHECK_S: SERVING for "" and
        logscore.v1.Scorer while ready, NOT_SERVING while not (no model loaded, no scoring process
        answering); scoring processes that died while idle are replaced first. NOTE: it was set
        SERVING once at start: with no model loaded, or every scoring process hung, health probes and
        shippers kept sending while /readyz said 503 (probe-observe)."""
        serving = True
        processes = self.service.processes
        while not self.stopping.is_set():
            if processes is not None:  # (in a thread: a replacement is a process started)
                await asyncio.to_thread(processes.replace_dead_idle)
            reason = not_ready_reason(self.service)
            if (reason is None) != serving and not self.stopping.is_set():
                serving = reason is None
                await self._set_health(serving)
                if serving:
                    log.info("ready again: gRPC health SERVING, /readyz 200")
                else:
                    log.warning("not ready: gRPC health NOT_SERVING, /readyz 503", extra={
                        "reason": reason, "models_dir": str(self.settings.models_dir)})
            try:
                await asyncio.wait_for(self.stopping.wait(), READINESS_CHECK_S)
            except asyncio.TimeoutError:
                pass

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _warn_when_no_default(self) -> None:
        """Say so, once per change, when requests naming no model have none to go to.

        NOTE: without default_model, the only model loaded is the default; a second one dropped in
        made every request naming no model (and matching no tag route) pass unscored, said only per
        request, at debug level in shippers' logs. Warned again when the loaded models change."""
        models = self.registry.snapshot.models
        try:
            default = self.registry.default(models)
        except ModelNotFound as error:
            if str(error) != self._no_default_warned and not models:  # a default would not help: say what does
                log.warning("no model loaded: every scoring call is refused (NOT_FOUND; shippers pass records "
                            "on unscored) and the sidecar is not ready; put a model file (.onnx, from `logscore "
                            "train --out DIR/NAME.onnx`) in the models directory, or fix the files rejected "
                            "there", extra={
                                "models_dir": str(self.settings.models_dir),
                                "rejected_files": sorted(self.registry.snapshot.errors)})
            elif str(error) != self._no_default_warned and self.registry.default_model:
                # NOTE: it said "set default_model" when default_model was set, its model gone
                log.warning("default model not loaded: requests naming no model and matching no tag route are "
                            "refused (NOT_FOUND; shippers pass them unscored); add its file to the models "
                            "directory, or change default_model",
                            extra={"models": sorted(models), "detail": str(error)})
            elif str(error) != self._no_default_warned:
                log.warning("no default model: requests naming no model and matching no tag route are refused "
                            "(NOT_FOUND; shippers pass them unscored); set default_model, or tag_routes for "
                            "their tags", extra={"models": sorted(models), "detail": str(error)})
            self._no_default_warned = str(error)
            return
        if self._no_default_warned is not None:
            log.info("requests naming no model go to the default model again", extra={"model": default.name})
        self._no_default_warned = None

    async def _start_grpc(self) -> None:
        s = self.settings
        token = s.token()
        options = [("grpc.max_receive_message_length", s.max_message_bytes),
                   ("grpc.max_send_message_length", s.max_message_bytes),
                   ("grpc.so_reuseport", 0),
                   # NOTE: what one connection may hold before admission (see STREAMS_PER_CONNECTION);
                   # max_grpc_calls refuses calls past it over all connections, counted and logged.
                   ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
                   # NOTE: the connections one listener takes at once: what each may hold bounded above,
                   # this bounds the sum (ConnectionWatch gauges the connections open and warns when full)
                   ("grpc.max_allowed_incoming_connections", s.max_grpc_connections),
                   # NOTE: no BDP probing: it widens a connection's windows to megabytes, and the streams
                   # past max_grpc_calls filled them before being refused (32 connections of 16 stalled
                   # calls: peak 729 MiB with it, 293 without). A call being read still gets a window
                   # the size of its message; loopback transfers of 2 MB messages were no slower.
                   ("grpc.http2.bdp_probe", 0)]
        # NOTE: the cap first: a call past it is refused whatever its token, before its message is read
        interceptors = [CallLimitInterceptor(s.max_grpc_calls, self.metrics)]
        if token:
            interceptors.append(TokenInterceptor(token, self.metrics))
        server = grpc.aio.server(options=options, interceptors=interceptors)
        self.scorer = ScorerServicer(self.service)
        server.add_generic_rpc_handlers((self.scorer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [scorer_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME], server)
        if s.socket:
            claim_socket(s.socket)  # again: grpc would silently replace a socket bound since the first check
            bind_grpc(lambda: server.add_insecure_port(f"unix:{s.socket}"), "--socket", s.socket)
        if s.tcp:
            if s.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
                    root_certificates=Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None,
                    require_client_auth=bool(s.tls_client_ca))
                port = bind_grpc(lambda: server.add_secure_port(s.tcp, credentials), "--tcp", s.tcp)
            else:
                port = bind_grpc(lambda: server.add_insecure_port(s.tcp), "--tcp", s.tcp)
            self.bound["grpc_tcp"] = f"{s.tcp.rpartition(':')[0]}:{port}"
        self.grpc_server = server
        await server.start()
        if s.socket:
            os.chmod(s.socket, int(s.socket_mode, 8))
            self.socket_identity = file_identity(s.socket)
            self.bound["grpc_unix"] = s.socket

    def _http_ssl(self) -> Optional[ssl.SSLContext]:
        s = self.settings
        if not s.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca:
            context.load_verify_locations(s.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def watch_models(self) -> None:
        """Reload on SIGHUP, and every reload_interval_s when set."""
        loop = asyncio.get_running_loop()
        interval = self.settings.reload_interval_s or None
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.reload_requested.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self.reload_requested.clear()
            retry_rejected, self.hangup = self.hangup, False
            if self.stopping.is_set():
                return
            try:
                await self._check_models(loop, retry_rejected)
            except Exception as error:  # NOTE: one failed pass used to end this task, and hot reload, unlogged
                self._check_failed(error)
            else:
                if self.check_failure is not None:
                    log.info("model check works again", extra={"dir": self.settings.models_dir})
                    self.check_failure = None

    def _check_failed(self, error: Exception) -> None:
        """Log a failed model check, once while it fails the same way (a traceback every
        reload_interval_s was 1,800 an hour)."""
        failure = (type(error).__name__, str(error))
        if failure == self.check_failure:
            return
        self.check_failure = failure
        log.exception("model check failed; the loaded models keep serving and the next check "
                      "(reload_interval_s, or SIGHUP) tries again (the same failure again is not logged; "
                      "'model check works again' when it clears); if this repeats, report it with the "
                      "exception", extra={"dir": self.settings.models_dir})

    async def _check_models(self, loop: asyncio.AbstractEventLoop, retry_rejected: bool = False) -> None:
        """One pass of the watch: reload, then what follows a change. NOTE: what follows stays pending
        until it runs through: a pass failing in it after a change left it undone for good (the next
        pass saw no change): /metrics' models, the warnings, the batchers' pruning."""
        changed = await loop.run_in_executor(None, self.registry.reload, retry_rejected)
        self.metrics.model_checks.inc()
        self.follow_up_pending = self.follow_up_pending or changed
        if self.follow_up_pending:
            self.metrics.set_models(self.registry.snapshot.models)
            self._warn_when_no_default()
            self._warn_unloaded_routes()
            await self.service.prune()
            self.follow_up_pending = False

    async def stop(self) -> None:
        """Drain: health says NOT_SERVING, new calls are refused, in-flight ones finish."""
        grace = self.settings.shutdown_grace_s
        log.info("shutting down", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        self.service.accepting = False
        if self.scorer is not None:
            self.scorer.end_streams()  # (a stream between messages holds no work to finish)
        # The surfaces take no new calls and give those already received the grace to be answered;
        # the forward port finishes the relays under way (and acknowledges them).
        await asyncio.gather(*(server.stop(grace) for server in (self.grpc_server, self.http_server,
                                                                 self.forward_server) if server is not None))
        await self.service.close()
        await asyncio.get_running_loop().run_in_executor(None, self.feedback.stop)
        self._remove_socket()
        log.info("stopped")

    def on_hangup(self) -> None:
        """SIGHUP: check the models now, and try rejected files again (the learner's requests do not)."""
        self.hangup = True
        self.reload_requested.set()

    async def abandon_start(self) -> None:
        """After a failed start: close what did start, quietly; leave no socket file behind."""
        for server in (self.grpc_server, self.http_server, self.forward_server):
            if server is not None:
                await server.stop(0)
        self.service.executor.shutdown(wait=False)
        self.service.close_processes()
        self.feedback.stop()
        self._remove_socket()

    def _remove_socket(self) -> None:
        """Remove our socket file, never one another process bound there since."""
        path = self.settings.socket
        if path and self.socket_identity is not None and file_identity(path) == self.socket_identity:
            os.unlink(path)


def file_identity(path: str) -> Optional[tuple[int, int]]:
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def claim_socket(path: str) -> None:
    """Make way for our Unix socket: remove a stale one, refuse a live one or a file that is no socket."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise ConfigError(f"--socket {path}: {error.strerror}; choose a --socket in a directory you may "
                          "write") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--socket {path}: exists and is not a socket; move it away or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left by a run that crashed
        return
    except OSError as error:
        raise ConfigError(f"--socket {path}: in use or not usable ({error.strerror or error}); stop the other "
                          "process or choose another --socket") from None
    finally:
        probe.close()
    raise ConfigError(f"--socket {path}: another process (a running logscore?) is serving on it; stop it "
                      "first or choose another --socket")


def listen_error(flag: str, address: str, error: OSError) -> ConfigError:
    reason = error.strerror or str(error)
    return ConfigError(f"{flag} {address}: cannot listen there ({reason}); stop what uses it or choose "
                       f"another {flag}")


def check_port_free(address: str, flag: str) -> None:
    """Bind and release the address, so a port in use is reported before any server starts."""
    host, port = split_host_port(address, flag)
    if port == 0:
        return
    try:
        family, kind, _, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except OSError as error:
        raise listen_error(flag, address, error) from None


async def listening(starting, flag: str, address: str) -> None:
    try:
        await starting
    except OSError as error:
        raise listen_error(flag, address, error) from None


def bind_grpc(add_port, flag: str, address: str) -> int:
    try:
        return add_port()
    except RuntimeError:  # grpc says only "Failed to bind to address"
        raise ConfigError(f"{flag} {address}: cannot listen there (in use, or the host or directory does "
                          f"not exist); choose another {flag}") from None


def make_learner(settings: Settings, registry: ModelRegistry, request_reload, metrics: Metrics):
    """The learner when `learn` is on and can run; says clearly at startup why not, and fails
    (ConfigError) when another sidecar learns into the same models directory or its learning lock
    cannot be taken there."""
    if not settings.learn:
        return None
    from .learning import Learner, learning_unavailable

    reason = learning_unavailable(settings)
    if reason is not None:
        log.warning(f"learning is off: {reason}", extra={"setting": "learn"})
        return None
    learner = Learner(settings, registry, request_reload, metrics)
    learner.claim_models_dir()
    log.info("learning is on", extra={"learn_records": settings.learn_records, "learn_window": settings.learn_window,
                                      "learn_window_bytes": settings.learn_window_bytes,
                                      "learn_retrain_records": settings.learn_retrain_records})
    return learner


async def run(settings: Settings) -> int:
    sidecar = Sidecar(settings)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, sidecar.stopping.set)
    loop.add_signal_handler(signal.SIGINT, sidecar.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, sidecar.on_hangup)
    try:
        await sidecar.start()
    except BaseException:
        await sidecar.abandon_start()
        raise
    watcher = asyncio.create_task(sidecar.watch_models())
    learning = asyncio.create_task(sidecar.learner.run()) if sidecar.learner is not None else None
    clock = asyncio.create_task(sidecar.behaviour.run(sidecar.stopping))
    readiness = asyncio.create_task(sidecar.follow_readiness())
    connections = asyncio.create_task(ConnectionWatch(settings.max_grpc_connections, sidecar.metrics)
                                      .run(sidecar.stopping))
    await sidecar.stopping.wait()
    if learning is not None:
        await sidecar.learner.stop()
        learning.cancel()
    notify_systemd(b"STOPPING=1")
    sidecar.reload_requested.set()
    sidecar.hub.close()  # watchers (WatchAnomalies, server-sent events) end; their calls finish
    await sidecar.stop()
    await watcher
    await clock
    await connections
    await readiness
    return 0


def notify_systemd(state: bytes) -> None:
    """Tell systemd (Type=notify) how the sidecar is: READY=1 once it serves, so that a reload
    (SIGHUP) waits until its handler is in place, and shippers ordered after it start then."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(state, address)
    except OSError as error:
        log.warning("could not notify systemd", extra={"socket": address, "error": str(error)})


def main(settings: Settings) -> int:
    configure_logging(settings.log_level)
    for name, meant in unknown_variables():
        log.warning("environment variable names no setting; ignored", extra={"variable": name, "did_you_mean": meant})
    tune_allocator()
    tune_collector()
    try:
        return asyncio.run(run(settings))
    except ConfigError as error:  # one line naming the setting and the fix, as for bad flags
        print(f"logscore serve: error: {error}", file=sys.stderr)
        return 1


def make_review(settings: Settings, metrics: Metrics):
    """The review page's ring of recent flagged records (None: review_records is 0)."""
    if not settings.review_records:
        return None
    from .review import ReviewRing

    return ReviewRing(settings.review_records, entity_field=settings.entity_field,
                      inspect_per_s=settings.review_inspect_per_s,
                      on_new_group=lambda model: metrics.child(metrics.review_groups, model).inc(),
                      on_not_grouped=lambda model, n: metrics.child(metrics.review_not_grouped, model).inc(n))


def make_feedback(settings: Settings, registry: ModelRegistry, review, metrics: Metrics):
    """The feedback service on --feedback-store (default: a SQLite file beside the models)."""
    from .feedback_store import FeedbackService, default_location, left_behind, open_store

    location = settings.feedback_store or default_location(settings.models_dir)
    store = open_store(location)
    earlier = left_behind(settings.models_dir, location)
    if earlier:
        log.warning("feedback given before is not applied: it is in the models directory's store, and "
                    "--feedback-store names another; to keep it, stop the sidecar and move that file to the "
                    "store's path (a SQLite store with no entries yet), or mark those records again; move it "
                    "aside to silence this", extra={"left_behind": earlier, "store": store.description})
    return FeedbackService(store, settings.feedback_poll_s, metrics.observe_feedback, registry, review,
                           max_entries=settings.feedback_max_entries)
