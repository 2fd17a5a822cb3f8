"""``chatrlhf serve`` flags. Light on purpose: ``chatrlhf serve --help`` imports only this and the config parser."""

from dataclasses import dataclass, field

from chatrlhf.config import Check
from chatrlhf.data.template import TEMPLATE_CHOICES
from chatrlhf.errors import UserError
from chatrlhf.models.registry import resolve_model_path


@dataclass
class ServeConfig:
    path: str = field(default=None, metadata={
        "help": "Checkpoint dir of the trained actor (e.g. OUTPUT/step3_ppo/actor)."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Interface to bind. The default keeps the server local; use 0.0.0.0 (with --api_key) to expose it."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    api_key: str = field(default=None, metadata={
        "help": "If set, requests must send `Authorization: Bearer KEY` (401 otherwise)."})
    model_name: str = field(default=None, metadata={"help": "Model id reported and accepted (default: the dir name)."})
    max_concurrency: int = field(default=1, metadata={"help": "Generations running at once."})
    max_queue: int = field(default=16, metadata={"help": "Requests allowed to wait for a slot; beyond it -> 429."})
    max_tokens_limit: int = field(default=1024, metadata={"help": "Largest max_tokens a request may ask for."})
    default_max_tokens: int = field(default=128, metadata={"help": "max_tokens when a request gives none."})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "Largest request body accepted (413 beyond)."})
    dtype: str = field(default="auto", metadata={"help": "auto (fp32 on CPU, bf16 on accelerators), fp32, bf16, fp16."})
    template: str = field(default="auto", metadata={
        "help": "How chat messages become text: auto (the format the checkpoint records it was trained with; with "
                "no record, the tokenizer's chat template when it has one, else DeepSpeed-Chat's "
                "' Human: ... Assistant:'), chat (the tokenizer's chat template) or dschat. /v1/completions "
                "continues the client's text as given.",
        "check": Check(choices=TEMPLATE_CHOICES)})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level: debug, info, warning, error."})
    cors_origins: str = field(default="", metadata={
        "help": "Comma-separated origins allowed to call the API from a browser (e.g. http://localhost:3000; * for "
                "any). Empty (default): no CORS headers, so browsers on other origins are refused."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the Python code in the model folder (a custom model family: config.json auto_map naming "
                "classes in its modeling_*.py). It runs with your permissions: only for folders you trust."})

    def origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in (self.cors_origins or "").split(",") if o.strip()]

    def validate(self) -> None:
        if not self.path:
            raise UserError("--path is required (a trained actor checkpoint dir)")
        self.path = resolve_model_path(self.path, "--path")  # smollm2 / x.gguf -> its converted folder
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise UserError("--max_concurrency must be >= 1 and --max_queue >= 0")
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be in 1..65535, got {self.port}")
        if self.default_max_tokens < 1 or self.max_tokens_limit < self.default_max_tokens:
            raise UserError("need 1 <= --default_max_tokens <= --max_tokens_limit")
        if self.max_body_bytes < 1:
            raise UserError(f"--max_body_bytes must be >= 1, got {self.max_body_bytes}")
        for o in self.origins():
            # an origin is scheme://host[:port] with no path; a typo here would silently never match
            scheme, sep, rest = o.partition("://")
            if o != "*" and (scheme not in ("http", "https") or not sep or not rest or "/" in rest):
                raise UserError(f"--cors_origins: {o!r} is not an origin like http://localhost:3000 (or *)")
