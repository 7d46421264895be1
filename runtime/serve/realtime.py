"""/v1/realtime: the core of OpenAI's Realtime API over a WebSocket, one conversation per connection.

Client events: session.update (voice, instructions, modalities, temperature, max_response_output_tokens,
omni), input_audio_buffer.append / .commit / .clear (base64 pcm16, 24 kHz mono unless the session says
otherwise), conversation.item.create (message items: input_text, input_audio, text), response.create,
response.cancel. Server events: session.created / .updated, input_audio_buffer.committed / .cleared,
conversation.item.created, response.created, response.output_item.added, response.text.delta (text only) or
response.audio.delta with response.audio_transcript.delta (speaking), their .done events, response.output_item.done,
response.done (status completed / cancelled / failed, usage), error.

Each response runs the whole conversation so far as one engine stream (the history is kept per connection:
committed audio, items, and the assistant's answers, a cancelled one as far as it got). response.cancel is
barge-in: the stream is cancelled at once, its slot freed at the next engine tick. A bad event gets an `error`
event and the connection goes on; nothing one connection sends reaches another.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

from fastapi import WebSocket, WebSocketDisconnect

from runtime.serve.errors import APIError, bad_request
from runtime.serve.inputs import audio_part, build_prompt, decode_base64, decode_pcm16
from runtime.serve.options import request_options
from runtime.streaming import AudioChunk, TextDelta

INPUT_RATE = 24000  # the Realtime API's pcm16 rate


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeConnection:
    def __init__(self, websocket: WebSocket, service):
        self.ws, self.service = websocket, service
        self.session = {"id": _id("sess"), "object": "realtime.session", "model": service.config.model_name,
                        "modalities": ["text", "audio"], "instructions": None, "voice": "ethan",
                        "input_audio_format": "pcm16", "output_audio_format": "pcm16", "temperature": None,
                        "max_response_output_tokens": None, "omni": None}
        self.audio_buffer = bytearray()
        self.items: list[dict] = []  # the conversation: {"id", "role", "content": [internal items]}
        self.response_task: asyncio.Task | None = None
        self.job = None
        self.cancel_requested = False
        self._send_lock = asyncio.Lock()

    async def send(self, kind: str, **fields) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps({"event_id": _id("event"), "type": kind, **fields}))

    async def send_error(self, err: APIError, event_id: str | None = None) -> None:
        await self.send("error", error={**err.body()["error"], "event_id": event_id})

    # ------------------------------------------------------------------ client events

    async def run(self) -> None:
        await self.send("session.created", session=self.session)
        try:
            while (message := await self.ws.receive())["type"] != "websocket.disconnect":
                event = {}
                try:
                    event = _parse_event(message)
                    handler = HANDLERS.get(event["type"])
                    if handler is None:
                        raise bad_request(f"unknown event type {event['type']!r}", "type", "invalid_event")
                    await handler(self, event)
                except APIError as err:
                    await self.send_error(err, event.get("event_id"))
                except (WebSocketDisconnect, RuntimeError):
                    raise
                except Exception as err:  # noqa: BLE001 - a bug met by one event fails that event, not the server
                    await self.send_error(APIError(500, f"internal error: {type(err).__name__}: {err}",
                                                   code="internal_error", kind="server_error"), event.get("event_id"))
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: sending on a socket the client has closed
            pass
        finally:
            self.cancel_response()
            if self.response_task is not None:
                await asyncio.gather(self.response_task, return_exceptions=True)

    async def session_update(self, event: dict) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            raise bad_request("session.update needs a 'session' object", "session")
        unknown = sorted(set(update) - set(self.session) - {"type", "turn_detection", "input_audio_transcription",
                                                              "tools", "tool_choice"})
        if unknown:
            raise bad_request(f"unknown session field(s) {', '.join(unknown)}", f"session.{unknown[0]}")
        for name in ("input_audio_format", "output_audio_format"):
            if update.get(name, "pcm16") != "pcm16":
                raise bad_request(f"{name} must be 'pcm16' (24 kHz mono)", f"session.{name}", "unsupported_value")
        merged = {**self.session, **{k: v for k, v in update.items() if k in self.session and k != "id"}}
        self._options(merged, {})  # a bad voice or sampling value fails here, not at the next response
        self.session = merged
        await self.send("session.updated", session=self.session)

    async def buffer_append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise bad_request("input_audio_buffer.append needs 'audio' (base64 pcm16)", "audio")
        raw = decode_base64(audio, "audio")
        if len(self.audio_buffer) + len(raw) > self.service.config.max_body_bytes:
            raise APIError(413, "the input audio buffer is over this server's limit", "audio", "buffer_too_large")
        self.audio_buffer += raw

    async def buffer_commit(self, event: dict) -> None:
        if not self.audio_buffer:
            raise bad_request("the input audio buffer is empty", "audio", "input_audio_buffer_commit_empty")
        waveform = await asyncio.to_thread(decode_pcm16, bytes(self.audio_buffer), INPUT_RATE, "audio")
        self.audio_buffer.clear()
        item = self.add_item("user", [audio_part(waveform)])
        await self.send("input_audio_buffer.committed", previous_item_id=item["previous_item_id"], item_id=item["id"])
        await self.send("conversation.item.created", previous_item_id=item["previous_item_id"], item=item["public"])

    async def buffer_clear(self, event: dict) -> None:
        self.audio_buffer.clear()
        await self.send("input_audio_buffer.cleared")

    async def item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise bad_request("conversation.item.create takes an item of type 'message'", "item.type")
        role = item.get("role")
        if role not in ("user", "assistant", "system"):
            raise bad_request("item.role must be user, assistant or system", "item.role")
        parts = item.get("content")
        if not isinstance(parts, list) or not parts:
            raise bad_request("item.content must be a non-empty list", "item.content")
        content = []
        for j, part in enumerate(parts):
            param = f"item.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "text") and isinstance(part.get("text"), str):
                content.append({"type": "text", "text": part["text"]})
            elif kind == "input_audio" and role == "user" and isinstance(part.get("audio"), str):
                raw = decode_base64(part["audio"], f"{param}.audio")
                content.append(audio_part(await asyncio.to_thread(decode_pcm16, raw, INPUT_RATE, f"{param}.audio")))
            else:
                raise bad_request(f"unsupported content part for a {role} item: {kind!r}", f"{param}.type")
        added = self.add_item(role, content)
        await self.send("conversation.item.created", previous_item_id=added["previous_item_id"], item=added["public"])

    async def response_create(self, event: dict) -> None:
        if self.response_task is not None and not self.response_task.done():
            raise bad_request("a response is in progress: cancel it first", None,
                              "conversation_already_has_active_response")
        params = event.get("response") or {}
        if not isinstance(params, dict):
            raise bad_request("response must be an object", "response")
        options = self._options(self.session, params)
        self.cancel_requested = False
        self.response_task = asyncio.create_task(respond(self, options, params.get("instructions")))

    async def response_cancel(self, event: dict) -> None:
        if self.response_task is None or self.response_task.done():
            raise bad_request("no response is in progress", None, "response_cancel_not_active")
        self.cancel_response()

    def cancel_response(self) -> None:
        self.cancel_requested = True
        if self.job is not None and self.job.stream is not None:
            self.job.stream.cancel(wait=False)

    # ------------------------------------------------------------------ responses

    def _options(self, session: dict, params: dict):
        max_tokens = params.get("max_output_tokens", session.get("max_response_output_tokens"))
        body = {"modalities": params.get("modalities", session["modalities"]),
                "audio": {"voice": params.get("voice", session["voice"]), "format": "pcm16"},
                "temperature": params.get("temperature", session["temperature"]),
                "max_tokens": None if max_tokens == "inf" else max_tokens, "omni": session.get("omni")}
        if body["max_tokens"] is not None and (isinstance(body["max_tokens"], bool)
                                               or not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1):
            raise bad_request("max output tokens must be a positive integer or 'inf'", "max_output_tokens")
        config = self.service.config
        return request_options(body, self.service.engine, streaming=True, default_max_tokens=config.default_max_tokens,
                               default_talker_max_new_tokens=config.default_talker_max_new_tokens)

    def add_item(self, role: str, content: list[dict], item_id: str | None = None) -> dict:
        previous = self.items[-1]["id"] if self.items else None
        item = {"id": item_id or _id("item"), "role": role, "content": content, "previous_item_id": previous}
        public = [{"type": "input_audio", "transcript": None} if c["type"] == "audio"
                  else {"type": "input_text" if role != "assistant" else "text", "text": c["text"]} for c in content]
        item["public"] = {"id": item["id"], "object": "realtime.item", "type": "message", "status": "completed",
                          "role": role, "content": public}
        self.items.append(item)
        return item


async def respond(conn: RealtimeConnection, options, instructions: str | None) -> None:
    """One response: the conversation so far as one engine stream, its events sent as they come; the answer (as
    far as it got) joins the history; response.done last, whatever happened."""
    service = conn.service
    response = {"id": _id("resp"), "object": "realtime.response", "status": "in_progress", "output": []}
    item_id, text, output_tokens, prompt_tokens = _id("item"), [], 0, 0
    status, details = "failed", None
    try:
        turns = [{"role": i["role"], "content": i["content"]} for i in conn.items]
        system = instructions or conn.session.get("instructions")
        if system:
            turns.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        prompt, prompt_tokens = await asyncio.to_thread(build_prompt, service.engine, turns, options.max_tokens)
        conn.job = service.admit("realtime")
        stream = await service.open_stream(conn.job, **prompt, **options.stream_kwargs)
        if conn.cancel_requested:
            stream.cancel(wait=False)
        await conn.send("response.created", response=response)
        item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}
        await conn.send("response.output_item.added", response_id=response["id"], output_index=0, item=item)
        where = dict(response_id=response["id"], item_id=item_id, output_index=0, content_index=0)
        async for event in stream:
            if isinstance(event, TextDelta):
                output_tokens += len(event.token_ids)
                if event.text:
                    text.append(event.text)
                    kind = "response.audio_transcript.delta" if options.speaks else "response.text.delta"
                    await conn.send(kind, delta=event.text, **where)
            elif isinstance(event, AudioChunk):
                data = base64.b64encode(event.samples.numpy().astype("<i2").tobytes()).decode()
                await conn.send("response.audio.delta", delta=data, **where)
        if conn.job.abort_reason is not None:
            details = {"type": "failed", "reason": conn.job.abort_reason}
            await conn.send_error(APIError(503, conn.job.abort_reason, code="shutting_down", kind="server_error"))
        elif stream.cancelled:
            status, details = "cancelled", {"type": "cancelled", "reason": "client_cancelled"}
        else:
            status = "completed"
            if options.speaks:
                await conn.send("response.audio.done", **where)
                await conn.send("response.audio_transcript.done", transcript="".join(text), **where)
            else:
                await conn.send("response.text.done", text="".join(text), **where)
    except APIError as err:
        await conn.send_error(err)
        details = {"type": "failed", "error": err.body()["error"]}
    except Exception as err:  # noqa: BLE001 - this response failed in the engine; the connection goes on
        details = {"type": "failed", "error": {"type": "server_error", "message": str(err)}}
    finally:
        if conn.job is not None:
            service.release(conn.job, {"completed": "ok", "cancelled": "cancelled"}.get(status, "error"))
            conn.job = None
    if text or status == "completed":  # the answer as far as it got joins the history
        added = conn.add_item("assistant", [{"type": "text", "text": "".join(text)}], item_id)
        response["output"] = [added["public"]]
        try:
            await conn.send("response.output_item.done", response_id=response["id"], output_index=0,
                            item=added["public"])
        except (WebSocketDisconnect, RuntimeError):
            pass
    response.update(status=status, status_details=details,
                    usage={"input_tokens": prompt_tokens, "output_tokens": output_tokens,
                           "total_tokens": prompt_tokens + output_tokens})
    try:
        await conn.send("response.done", response=response)
    except (WebSocketDisconnect, RuntimeError):  # the client has gone: nobody to tell
        pass


def _parse_event(message: dict) -> dict:
    text = message.get("text")
    if text is None:
        raise bad_request("events are JSON text frames, not binary", None, "invalid_event")
    try:
        event = json.loads(text)
    except ValueError as err:
        raise bad_request(f"malformed JSON event: {err}", None, "invalid_json") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise bad_request("an event is a JSON object with a string 'type'", "type", "invalid_event")
    return event


HANDLERS = {
    "session.update": RealtimeConnection.session_update,
    "input_audio_buffer.append": RealtimeConnection.buffer_append,
    "input_audio_buffer.commit": RealtimeConnection.buffer_commit,
    "input_audio_buffer.clear": RealtimeConnection.buffer_clear,
    "conversation.item.create": RealtimeConnection.item_create,
    "response.create": RealtimeConnection.response_create,
    "response.cancel": RealtimeConnection.response_cancel,
}


async def realtime_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    connection = RealtimeConnection(websocket, websocket.app.state.service)
    websocket.app.state.realtime.add(connection)
    try:
        await connection.run()
    finally:
        websocket.app.state.realtime.discard(connection)
