"""Scale-out through Ray Serve: many engines (one per GPU, across machines) behind one OpenAI endpoint.

    python -m runtime serve --replicas 2 [--ray-address auto] [--gpus-per-replica 1] [--autoscale 1:8]
    serve run runtime/serve/serve_config.yaml          # the same application from a config file

Each replica of the `OmniReplica` deployment holds one `OmniEngine` and serves the single-process server's
FastAPI app (runtime/serve/app.py) as its Serve ingress, so routes, request and event shapes, admission and
metrics are those of `python -m runtime serve`; nothing here re-implements a route. What Serve adds:

- Routing: Serve's request router sends each request to the less loaded (fewer open requests, so more free
  session slots) of two sampled replicas. A replica admits `max_sessions + max_queue` requests as the single
  server does and answers the next one its 429 with Retry-After, so beyond the cluster's capacity a client gets
  the same 429. Serve's own limit per replica (`max_ongoing_requests`) leaves `max_sessions` more for what
  holds no slot (realtime connections between responses, /health, /metrics), so Serve never queues a request
  that a replica could admit or refuse; nothing is bounded in the proxy (its bound counts a burst's requests
  before they are assigned, and refuses some that the replicas had room for). The router's view of the load
  lags a burst a little, so a nearly full replica can refuse a request another had room for: clients retry a
  429 after Retry-After, as with one server.
- Streams: an SSE response and a WebSocket are one ASGI call on one replica, passed through message by message;
  the realtime conversation stays on its replica for the whole connection.
- Faults: Serve restarts a replica whose process died or whose `check_health` failed (it asks the engine loop
  for a no-op between ticks, so a wedged loop fails it); new requests go to the survivors meanwhile. A stream
  cut by its replica's death ends with an OpenAI error event and `data: [DONE]` (`StreamGuard`, a middleware
  of Serve's HTTP proxy; its import path is put in the proxy's environment before Ray starts).
- Every response says which replica answered (`x-omni-replica`), /health carries the replica id and pid, and
  /metrics is that replica's Prometheus text; Serve's own metrics are on Ray's metrics port.

Ray is an optional dependency (requirements-scale.txt, `pip install omni-rt[scale]`): only this module imports it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

from ray import serve

from runtime.serve.errors import APIError

REPLICA_HEADER = "x-omni-replica"
APP_NAME = "omni-rt"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "runtime.serve.scale.proxy_middlewares"
HEALTH_TIMEOUT_S = 20.0

# The `python -m runtime serve` options (their defaults are the CLI's) a replica and its deployment are built from.
ENGINE_OPTIONS = ("checkpoint", "device", "dtype", "kernels", "max_sessions", "max_seq_len")
SERVER_OPTIONS = ("model_name", "max_queue", "max_body_mb", "max_tokens", "talker_max_new_tokens", "allow_local_files")
SCALE_OPTIONS = ("replicas", "gpus_per_replica", "cpus_per_replica", "autoscale", "health_check_period_s", "log_level")


class ReplicaHeader:
    """ASGI middleware of a replica's app: every HTTP response and WebSocket handshake names the replica."""

    def __init__(self, app, replica_id: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class StreamGuard:
    """ASGI middleware of Serve's HTTP proxy: an event stream its replica stopped in the middle (the replica's
    process died, or the proxy lost it) gets a final OpenAI error event and `data: [DONE]`, so an SSE client
    sees a clean failure instead of a connection cut mid-body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"sse": False, "ended": False}

        async def watched_send(message):
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                state["sse"] = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        failure = "the replica serving this stream stopped"
        try:
            await self.app(scope, receive, watched_send)
        except Exception as err:  # noqa: BLE001 - after the response started nobody else can tell the client
            if not state["sse"] or state["ended"]:
                raise
            failure += f" ({type(err).__name__})"
        if state["sse"] and not state["ended"]:
            error = APIError(503, f"{failure}; retry the request", code="replica_failed", kind="server_error")
            body = f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
            try:
                await send({"type": "http.response.body", "body": body, "more_body": False})
            except Exception:  # noqa: BLE001 - the client is gone too
                pass


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): the proxy's middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(StreamGuard)]


@serve.ingress()
class OmniReplica:
    """One engine and one copy of the single-process server's app (built on the replica by Serve)."""

    def __init__(self, engine_options: dict, server_options: dict):
        from runtime.serve.cli import load_engine, serve_config

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.engine = load_engine(engine_options)
        self.config = serve_config(server_options, replica_id=self.replica_id)

    def __serve_build_asgi_app__(self):
        from runtime.serve.app import create_app

        app = create_app(self.engine, self.config)
        app.add_middleware(ReplicaHeader, replica_id=self.replica_id)
        return app

    async def check_health(self) -> None:
        """Fails when the engine loop does not answer a no-op between ticks in HEALTH_TIMEOUT_S (wedged) or
        has stopped; Serve then replaces this replica."""
        loop = self.engine.loop
        if loop is None:  # no request has started the loop yet: nothing can be wedged
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(loop.call, lambda scheduler: None), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the engine loop did not answer in {HEALTH_TIMEOUT_S} s") from None

    def __del__(self):
        engine = getattr(self, "engine", None)  # None when loading failed
        if engine is not None:
            engine.close()


def deployment_options(options: dict) -> dict:
    """Serve deployment options from the launch options: resources, routing limits, autoscaling, health."""
    max_sessions, max_queue = options["max_sessions"], options["max_queue"]
    resources = {"num_cpus": options["cpus_per_replica"]}
    if options["gpus_per_replica"]:
        resources["num_gpus"] = options["gpus_per_replica"]
    out = {"ray_actor_options": resources, "max_ongoing_requests": 2 * max_sessions + max_queue,
           "health_check_period_s": options["health_check_period_s"],
           "health_check_timeout_s": HEALTH_TIMEOUT_S + 10, "graceful_shutdown_timeout_s": 10,
           "logging_config": {"log_level": options["log_level"].upper()}}
    if options["autoscale"]:
        low, high = parse_autoscale(options["autoscale"])
        # Scale up while three quarters of the average replica's slots are busy: loading a replica takes
        # minutes, so it should start before the slots run out and requests queue.
        out["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": low,
                                     "target_ongoing_requests": max(1.0, 0.75 * max_sessions)}
    else:
        out["num_replicas"] = options["replicas"]
    return out


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def cli_options(args: dict | None = None) -> dict:
    """`args` over the CLI's defaults for every option the application uses; an unknown one is an error."""
    from runtime.__main__ import build_parser

    defaults = vars(build_parser().parse_args(["serve"]))
    known = (*ENGINE_OPTIONS, *SERVER_OPTIONS, *SCALE_OPTIONS)
    unknown = set(args or {}) - set(known)
    if unknown:
        raise ValueError(f"unknown omni-rt option(s) {sorted(unknown)}; known: {', '.join(known)}")
    options = {key: defaults[key] for key in known}
    options.update(args or {})
    options["replicas"] = options["replicas"] or 1
    return options


def build_app(args: dict):
    """The Serve application (also `serve run`'s import path, with `args` from the config file)."""
    options = cli_options(args)
    engine_options = {key: options[key] for key in ENGINE_OPTIONS}
    server_options = {key: options[key] for key in SERVER_OPTIONS}
    deployment = serve.deployment(OmniReplica, name="OmniReplica").options(**deployment_options(options))
    return deployment.bind(engine_options, server_options)


def start_ray(address: str | None, num_cpus: float | None = None):
    """Join the cluster at `address`, or start a local one. The proxy's stream guard is named in the
    environment first: a local cluster's processes inherit it (a joined cluster must have been started with
    it, see README "More than one GPU")."""
    import ray

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    if address:
        return ray.init(address=address, logging_level="warning")
    return ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="warning")


def serve_metrics_url() -> str:
    """This node's Prometheus endpoint of Ray (Serve's request, latency and replica metrics among them)."""
    import ray

    node = ray._private.worker.global_worker.node  # no public accessor for the export port in Ray 2.60
    return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_scaled(args) -> int:
    """`python -m runtime serve --replicas N | --autoscale MIN:MAX`: deploy, print the URL and a ready line,
    run until SIGINT / SIGTERM, then take the application down (and Serve and Ray, on a cluster this started).
    On a joined cluster whose Serve already runs, Serve keeps its own HTTP host and port."""
    import ray

    options = cli_options({key: getattr(args, key) for key in (*ENGINE_OPTIONS, *SERVER_OPTIONS, *SCALE_OPTIONS)})
    # a bad --autoscale fails before Ray starts
    replicas = parse_autoscale(options["autoscale"])[1] if options["autoscale"] else options["replicas"]
    port = args.port or free_port(args.host)
    start = time.perf_counter()
    start_ray(args.ray_address, num_cpus=None if args.ray_address else max(os.cpu_count() or 1,
                                                                          replicas * args.cpus_per_replica))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": port},
                    logging_config={"log_level": args.log_level.upper()})  # the proxy's access log: at info
        url = f"http://{args.host}:{port}"
        count = f"{options['autoscale']} (autoscaled)" if options["autoscale"] else str(replicas)
        print(f"serving {args.model_name} ({args.checkpoint}) through Ray Serve at {url}: {count} replica(s), "
              f"{args.gpus_per_replica:g} GPU(s) each", flush=True)
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"deployed in {time.perf_counter() - start:.2f} s", flush=True)
        print(f"serve metrics: {serve_metrics_url()}", flush=True)
        print(f"ready: {url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            if args.ray_address:  # a cluster this joined: take down only this application
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    print("stopped", flush=True)
    return 0
