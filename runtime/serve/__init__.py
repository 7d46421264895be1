"""An OpenAI-compatible HTTP server around one `OmniEngine` (`python -m runtime serve`).

    app.py        FastAPI app factory: routes, body limit, error handlers
    chat.py       POST /v1/chat/completions (SSE streaming with speech packets, or one JSON answer)
    realtime.py   /v1/realtime WebSocket (OpenAI Realtime core events, barge-in, per-connection history)
    service.py    the engine, bounded admission (429 beyond --max-queue), open jobs, shutdown
    inputs.py     OpenAI messages -> thinker prompt tensors (base64 audio, images, multi-turn chat)
    options.py    request_options(body): OpenAI sampling and omni-rt extension fields -> engine keywords
    audio_out.py  speech -> wav / pcm16 / flac / mp3 / opus bytes
    metrics.py    Prometheus metrics (latency, RTF, per-stage histograms, outcomes, queue, slots)
    schemas.py    pydantic request shapes; errors.py  OpenAI-style error objects
    cli.py        uvicorn server with a ready line and a clean SIGINT/SIGTERM shutdown
    scale.py      the same app on many engines through Ray Serve (--replicas / --autoscale; optional ray)

Every request runs on the engine loop (runtime/engine_loop.py) like any `engine.stream`, so a served stream
equals `engine.generate` on the same prompt; the HTTP side only moves events out as they come.
"""
