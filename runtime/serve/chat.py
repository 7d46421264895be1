"""POST /v1/chat/completions: one request in OpenAI's Chat Completions shape -> an engine stream.

`stream: true` answers with server-sent events as the engine produces them: `delta.content` per text delta
(with `delta.audio.transcript` when speaking), `delta.audio.data` (base64 pcm16, 24 kHz mono) once per audio
packet as soon as it is ready, a last chunk with `finish_reason` and `usage`, then `data: [DONE]`. Otherwise
one JSON answer with `message.content` and `message.audio.data` (the speech in the asked format). Both carry
omni-rt's extension field `omni`: the generated token ids and the engine's timing record of the request.
A client that goes away mid-stream cancels its request, which frees its slot at the next engine tick.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from runtime.serve.audio_out import encode_audio
from runtime.serve.errors import APIError, bad_request, loc_to_param
from runtime.serve.inputs import build_prompt, parse_messages
from runtime.serve.options import request_options
from runtime.serve.schemas import ChatCompletionRequest
from runtime.streaming import AudioChunk, TextDelta

AUDIO_EXPIRY_S = 3600


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object; 413 past max_bytes (read no further), 400 when it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body of {declared} bytes is over this server's limit of {max_bytes}",
                       code="request_too_large")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > max_bytes:
            raise APIError(413, f"request body is over this server's limit of {max_bytes} bytes",
                           code="request_too_large")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"malformed JSON body: {err}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", None, "invalid_json")
    return data


def validate(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        # Of a union's failed branches, the error that reaches deepest into the body names the field best.
        params = [(loc_to_param(e["loc"], data), e) for e in err.errors()]
        param, first = max(params, key=lambda pe: len(pe[0] or ""))
        raise bad_request(f"{param or 'body'}: {first['msg']}", param, "invalid_type") from None


def timings_dict(timings) -> dict:
    names = ("preprocess", "thinker_first_token", "talker_first_frame", "first_packet", "total", "audio_seconds")
    out = {name: getattr(timings, name) for name in names}
    out["rtf"] = timings.rtf
    return out


class Answer:
    """What a request has produced so far."""

    def __init__(self, max_tokens: int, prompt_tokens: int, prepare_seconds: float):
        self.max_tokens, self.prompt_tokens = max_tokens, prompt_tokens
        self.prepare_seconds = prepare_seconds  # request received -> engine.stream called (decoding, features)
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.samples: list[np.ndarray] = []
        self.sample_rate = 24000

    def add(self, event) -> None:
        if isinstance(event, TextDelta):
            self.text.append(event.text)
            self.token_ids += event.token_ids
        elif isinstance(event, AudioChunk):
            self.samples.append(event.samples.numpy())
            self.sample_rate = event.sample_rate

    @property
    def finish_reason(self) -> str:
        # A TextDelta carries every token but the EOS: reaching max_tokens means the answer was cut.
        return "length" if len(self.token_ids) >= self.max_tokens else "stop"

    def extension(self, timings) -> dict:
        """omni-rt's `omni` field: the token ids and the engine's timing record, plus the server's own share."""
        return {"token_ids": self.token_ids, "timings": timings_dict(timings), "server_prepare": self.prepare_seconds}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids),
                "total_tokens": self.prompt_tokens + len(self.token_ids)}


async def chat_completions(request: Request):
    received = time.perf_counter()
    service = request.app.state.service
    engine, config = service.engine, service.config
    body = validate(ChatCompletionRequest, await read_json(request, config.max_body_bytes))
    if body.model != config.model_name:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {config.model_name!r}",
                       "model", "model_not_found")
    options = request_options(body.model_dump(), engine, streaming=body.stream,
                              default_max_tokens=config.default_max_tokens,
                              default_talker_max_new_tokens=config.default_talker_max_new_tokens)
    turns = await asyncio.to_thread(parse_messages, body, config.allow_local_files)
    prompt, prompt_tokens = await asyncio.to_thread(build_prompt, engine, turns, options.max_tokens)
    job = service.admit("chat")
    prepare_seconds = time.perf_counter() - received
    try:
        stream = await service.open_stream(job, **prompt, **options.stream_kwargs)
    except BaseException:
        service.release(job, "error")
        raise
    answer = Answer(options.max_tokens, prompt_tokens, prepare_seconds)
    ident = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        return StreamingResponse(_events(service, job, stream, answer, ident, options.speaks),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(request, service, job, stream, answer, ident, options)


def _chunk(ident: str, model: str, delta: dict, finish_reason=None, **extra) -> str:
    chunk = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
    return f"data: {json.dumps(chunk)}\n\n"


def _error_event(message: str, code: str) -> str:
    return f"data: {json.dumps(APIError(500, message, code=code, kind='server_error').body())}\n\n"


async def _events(service, job, stream, answer: Answer, ident: str, speaks: bool):
    model, audio_id = service.config.model_name, f"audio_{ident}"
    outcome = "disconnected"  # unless the loop below ends: the client went away (this task was cancelled)
    try:
        yield _chunk(ident, model, {"role": "assistant", "content": ""})
        async for event in stream:
            answer.add(event)
            if isinstance(event, TextDelta) and event.text:
                delta = {"content": event.text}
                if speaks:
                    delta["audio"] = {"id": audio_id, "transcript": event.text}
                yield _chunk(ident, model, delta)
            elif isinstance(event, AudioChunk):
                data = base64.b64encode(event.samples.numpy().astype("<i2").tobytes()).decode()
                yield _chunk(ident, model, {"audio": {"id": audio_id, "data": data,
                                                      "expires_at": int(time.time()) + AUDIO_EXPIRY_S}})
        if job.abort_reason is not None or stream.cancelled:
            outcome = "cancelled"
            yield _error_event(job.abort_reason or "the request was cancelled", "cancelled")
        else:
            outcome = "ok"
            yield _chunk(ident, model, {}, answer.finish_reason, usage=answer.usage(),
                         omni=answer.extension(stream.timings))
        yield "data: [DONE]\n\n"
    except Exception as err:  # noqa: BLE001 - the request failed in the engine: tell this client only
        outcome = "error"
        yield _error_event(f"generation failed: {err}", "generation_failed")
        yield "data: [DONE]\n\n"
    finally:
        service.release(job, outcome)


async def _watch_disconnect(request: Request, stream) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.cancel(wait=False)
            return


async def _complete(request, service, job, stream, answer: Answer, ident: str, options):
    watcher = asyncio.create_task(_watch_disconnect(request, stream))
    outcome = "error"
    try:
        async for event in stream:
            answer.add(event)
        if stream.cancelled:
            outcome = "cancelled"
            raise APIError(503 if job.abort_reason else 499, job.abort_reason or "the request was cancelled",
                           code="cancelled", kind="server_error")
        outcome = "ok"
    except APIError:
        raise
    except Exception as err:  # noqa: BLE001
        raise APIError(500, f"generation failed: {err}", code="generation_failed", kind="server_error") from None
    finally:
        watcher.cancel()
        service.release(job, outcome)
    text = "".join(answer.text)
    message = {"role": "assistant", "content": text, "refusal": None, "audio": None}
    if options.speaks:
        samples = np.concatenate(answer.samples) if answer.samples else np.zeros(0, np.int16)
        data = await asyncio.to_thread(encode_audio, samples, answer.sample_rate, options.audio_format)
        message["audio"] = {"id": f"audio_{ident}", "data": base64.b64encode(data).decode(),
                            "expires_at": int(time.time()) + AUDIO_EXPIRY_S, "transcript": text}
    return JSONResponse({
        "id": ident, "object": "chat.completion", "created": int(time.time()), "model": service.config.model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason, "logprobs": None}],
        "usage": answer.usage(), "omni": answer.extension(stream.timings)})
