"""`python -m runtime serve`: load the engine, serve the app with uvicorn, shut down cleanly.

Prints the URL and then a ready line (`ready: http://HOST:PORT`) once the socket listens (with --port 0 the
port the system picked). SIGINT / SIGTERM: new requests get 503, every open stream ends with a final error
event (its slot freed), uvicorn drains the connections, the engine loop is closed; exit status 0.
With --replicas N or --autoscale MIN:MAX the same app runs on N engines through Ray Serve (runtime/serve/scale.py).
"""

from __future__ import annotations

import time


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, realtime, metrics)")
    p.add_argument("--checkpoint", default="tiny", help="checkpoint directory or preset (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--kernels", default=None, help="torch, triton or cuda (default: the process's choice)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--model-name", default="omni-rt", help="the model id clients send (default: %(default)s)")
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions (scheduler slots)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="thinker tokens per slot (prompt + answer)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond the slots before 429")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (413 beyond)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens when a request gives none")
    p.add_argument("--talker-max-new-tokens", type=int, default=1024,
                   help="codec frames (80 ms) at most per answer unless the request's omni field says less")
    p.add_argument("--allow-local-files", action="store_true", help="accept local image paths in requests")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default: %(default)s)")
    scale = p.add_argument_group("more than one engine (Ray Serve: pip install omni-rt[scale]; runtime/serve/scale.py)")
    scale.add_argument("--replicas", type=int, default=None, help="serve N engines through Ray Serve")
    scale.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                       help="Ray Serve autoscaling between MIN and MAX replicas on ongoing requests")
    scale.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto': the local node's); "
                       "default: start a local one")
    scale.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (default: %(default)s)")
    scale.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica (default: %(default)s)")
    scale.add_argument("--health-check-period-s", type=float, default=10.0,
                       help="seconds between Serve's health checks of a replica's engine loop (default: %(default)s)")
    p.set_defaults(run=serve)


def load_engine(options: dict):
    """The engine `serve` runs, from the CLI's engine options, its caches built before the server says ready."""
    import torch

    from runtime.engine import OmniEngine
    from runtime.options import SchedulerConfig

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    engine = OmniEngine.from_pretrained(
        options["checkpoint"], device=options["device"], dtype=dtypes[options["dtype"]], kernels=options["kernels"],
        scheduler=SchedulerConfig(max_sessions=options["max_sessions"], max_seq_len=options["max_seq_len"]))
    engine.scheduler  # noqa: B018 - build the caches (and capture graphs) before saying ready
    return engine


def serve_config(options: dict, replica_id: str | None = None):
    from runtime.serve.service import ServeConfig

    return ServeConfig(model_name=options["model_name"], max_queue=options["max_queue"],
                       max_body_bytes=int(options["max_body_mb"] * 1024 * 1024),
                       allow_local_files=options["allow_local_files"], default_max_tokens=options["max_tokens"],
                       default_talker_max_new_tokens=options["talker_max_new_tokens"], replica_id=replica_id)


def serve(args) -> int:
    if args.replicas is not None or args.autoscale is not None:  # the Ray Serve way (ray is imported only here)
        from runtime.serve.scale import serve_scaled

        return serve_scaled(args)
    import uvicorn

    from runtime.serve.app import create_app

    start = time.perf_counter()
    engine = load_engine(vars(args))
    print(f"loaded {args.checkpoint} on {args.device} ({args.dtype}) in {time.perf_counter() - start:.2f} s",
          flush=True)
    config = serve_config(vars(args))
    app = create_app(engine, config)
    server = _server_class()(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off",
                                    ws_max_size=config.max_body_bytes, timeout_graceful_shutdown=10))
    server.service = app.state.service
    where = f"http://{args.host}:{args.port}" if args.port else f"http://{args.host} (a free port: see the ready line)"
    print(f"serving {args.model_name} ({args.checkpoint}) at {where}", flush=True)
    try:
        server.run()
    finally:
        engine.close()
    print("stopped", flush=True)
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, plus a ready line and a shutdown that first ends the open streams."""

        service = None

        async def startup(self, sockets=None) -> None:
            import asyncio

            self._event_loop = asyncio.get_running_loop()
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"ready: http://{host}:{port}", flush=True)

        def handle_exit(self, sig, frame) -> None:
            # A signal handler: hand the work to the event loop; a second SIGINT forces the exit.
            if self.should_exit:
                self.force_exit = True
                return
            self.should_exit = True
            loop = getattr(self, "_event_loop", None)
            if loop is not None and self.service is not None:
                loop.call_soon_threadsafe(self.service.begin_shutdown)

    return Server
