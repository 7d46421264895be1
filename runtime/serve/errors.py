"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`, one line, naming the field."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses; `param` names the offending field (dotted path), when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        message = " ".join(self.message.split())  # one line, whatever the underlying error looked like
        return {"error": {"message": message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def loc_to_param(loc, data) -> str | None:
    """pydantic's error location -> the field as the client wrote it ('messages[0].content[1].input_audio.data'):
    the location is walked through the body itself, so the branch names pydantic adds for unions ('str',
    'list[...]', a discriminator's tag) are left out."""
    out, node = "", data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            out += ("." if out else "") + part
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out += f"[{part}]"
        else:
            continue  # a union branch or a tag, not a field of the body
        node = node[part]
    last = loc[-1] if loc else None
    if isinstance(node, dict) and isinstance(last, str) and last not in node and "[" not in last:
        out += ("." if out else "") + last  # a missing required field
    return out or None
