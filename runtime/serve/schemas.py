"""Request shapes of the OpenAI Chat Completions API as omni-rt serves them (pydantic v2, strict types: "8" is
not an int, and a wrong type is a 400 naming the field). Unknown top-level fields are ignored, as OpenAI
clients send optional ones (user, metadata, ...) that change nothing here."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from runtime.frontend.audio import OUTPUT_FORMATS

AUDIO_OUT_FORMATS = tuple(OUTPUT_FORMATS)  # wav, flac, mp3, opus, pcm16


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class InputAudio(_Strict):
    data: str  # base64 of a whole file
    format: Literal["wav", "flac", "mp3"]


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class ImageURL(_Strict):
    url: str  # a data: URL, or a local path / file:// URL when the server allows local files
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, InputAudioPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore")  # name, audio {id}, tool fields: not used here
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class AudioParams(_Strict):
    voice: str
    format: str = "wav"  # checked by the server so the error names the supported formats


class StreamOptions(_Strict):
    include_usage: bool = True


class OmniOptions(_Strict):
    """omni-rt's extension field `omni` (send it with the openai client as `extra_body={"omni": {...}}`)."""

    talker_max_new_tokens: int | None = Field(default=None, ge=2)  # codec frames (80 ms each) at most, + 1
    chunk_frames: int | None = Field(default=None, ge=1)  # codec frames per streamed audio packet
    talker_temperature: float | None = Field(default=None, ge=0)
    talker_top_p: float | None = Field(default=None, gt=0, le=1)
    talker_top_k: int | None = Field(default=None, ge=0)
    talker_repetition_penalty: float | None = Field(default=None, gt=0)


class ChatCompletionRequest(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioParams | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)
    omni: OmniOptions | None = None

    @property
    def wants_audio(self) -> bool:
        return self.modalities is not None and "audio" in self.modalities
