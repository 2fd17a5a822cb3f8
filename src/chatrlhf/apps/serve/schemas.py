"""Request bodies. The pydantic models are built on first use (``request_models``), so importing this package, and
``chatrlhf serve --help``, stays light; ``parse`` turns a validation failure into a 400 naming the field."""

from functools import cache
from typing import Annotated, Literal, NamedTuple, Optional, Union

from chatrlhf.apps.serve.errors import APIError, validation_message

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the range torch.manual_seed accepts


def utf8_text(v: str) -> str:
    # JSON may escape lone surrogates ("\ud800"); they are not text and the tokenizer cannot encode them
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (contains an unpaired surrogate escape)") from None
    return v


class RequestModels(NamedTuple):
    chat: type  # ChatRequest: POST /v1/chat/completions
    completion: type  # CompletionRequest: POST /v1/completions


@cache
def request_models() -> RequestModels:
    """The pydantic request models, built once."""
    from pydantic import AfterValidator, BaseModel, ConfigDict, Field  # lazy: pydantic stays out of start-up

    Text = Annotated[str, AfterValidator(utf8_text)]

    class _Base(BaseModel):
        # unknown OpenAI options (logit_bias, user, ...) are accepted; inf/NaN never pass as a number
        model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    class TextPart(_Base):
        type: Literal["text"]
        text: Text

    class Message(_Base):
        role: Literal["system", "user", "assistant", "developer"]
        content: Union[Text, list[TextPart], None] = None

    class StreamOptions(_Base):
        include_usage: bool = False

    class Sampling(_Base):
        model: Optional[str] = None
        max_tokens: Optional[int] = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        n: int = Field(default=1, ge=1)
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        stop: Union[Text, list[Text], None] = None
        seed: Optional[int] = Field(default=None, ge=SEED_MIN, le=SEED_MAX)

    class ChatRequest(Sampling):
        messages: list[Message]
        max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    class CompletionRequest(Sampling):
        prompt: Union[Text, list[Text]]
        max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions

    return RequestModels(ChatRequest, CompletionRequest)


def parse(schema: type, data: dict):
    """``data`` (a decoded JSON object) as a ``schema`` request; a failure is a 400 naming the field."""
    from pydantic import ValidationError  # lazy: pydantic stays out of start-up (loaded by request_models anyway)

    try:
        return schema.model_validate(data)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise APIError(400, msg, param=param, code="invalid_value") from None
