"""Chat generation on an OpenAI-compatible chat-completions server.

The user simulator, a judge or a reward model's chat model can run in another process or on another
machine: a local vLLM server (``python -m vllm.entrypoints.openai.api_server --model <folder>
--served-model-name <name>``), or any server that speaks the OpenAI chat-completions API
(``POST {base_url}/chat/completions``; https://platform.openai.com/docs/api-reference/chat/create).
Transport, authentication, time-outs and retries with exponential back-off are those of the official
``openai`` client; this module maps :class:`~dialogsim.sampling.SamplingParams` to the request and
the reply to a :class:`~dialogsim.backends.base.Completion`, and turns every failure into a
:class:`ServerError` that says which server, model and conversation failed, and how to fix it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import openai

from dialogsim.backends.base import Completion
from dialogsim.messages import Message
from dialogsim.sampling import SamplingParams

PLACEHOLDER_API_KEY = "EMPTY"
"""Key sent when the ``api_key_env`` variable is unset (servers without authentication ignore it)."""

FINISH_REASONS = ("stop", "length")
EXCERPT_CHARS = 300


class ServerError(RuntimeError):
    """A chat-completions request failed: no usable reply came back from the server.

    Raised for time-outs, connection failures and 5xx/429 answers once the retries are used up,
    for 4xx answers at once (they are not retried), and for replies that are not a chat completion
    (not JSON, no ``choices``, ``content`` null, unknown ``finish_reason``).

    Attributes:
        base_url: the server URL the backend was built with.
        model: the model name sent in the request.
        conversation_index: index in the batch of the conversation whose request failed (``None``
            when the failure is not tied to one conversation).
        status_code: HTTP status of the failing answer, if the server answered at all.
    """

    def __init__(
        self,
        message: str,
        *,
        base_url: str,
        model: str,
        conversation_index: int | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.base_url = base_url
        self.model = model
        self.conversation_index = conversation_index
        self.status_code = status_code


def _excerpt(text: object) -> str:
    text = str(text)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"


class OpenAIChatBackend:
    """:class:`~dialogsim.backends.base.ChatBackend` on an OpenAI-compatible chat-completions server.

    Each conversation of a batch is one ``POST {base_url}/chat/completions`` request (``n=1``); the
    requests run concurrently on a thread pool of at most ``max_concurrency`` threads, and the
    completions come back in the order of the conversations. The server renders the messages with
    its own chat template.

    Args:
        base_url: server URL including the API prefix, e.g. ``http://127.0.0.1:8000/v1``.
        model: model name as the server knows it (vLLM: ``--served-model-name``; see
            ``GET {base_url}/models``).
        api_key_env: name of the environment variable holding the API key. When it is unset, the
            placeholder key ``"EMPTY"`` is sent, which is what servers without authentication (vLLM
            started without ``--api-key``) expect.
        timeout: seconds allowed per request attempt, for connecting and for each read of the
            answer (``openai`` client ``timeout``). A request can therefore take up to about
            ``(max_retries + 1) * timeout`` seconds plus back-off sleeps.
        max_retries: retries of one request after a time-out, connection error, 408, 409, 429 or
            5xx answer, with the ``openai`` client's exponential back-off (0.5 s, 1 s, 2 s, ... capped
            at 8 s, up to 25 % jitter, ``Retry-After`` honoured). Other 4xx answers and malformed
            replies are not retried.
        max_concurrency: maximum number of requests in flight at once (threads).
        return_token_ids: ask for the generated and prompt token ids (vLLM's ``return_token_ids``
            request extension, vLLM >= 0.10.2). Servers that reject unknown fields (api.openai.com
            answers 400) need ``False``; the ids are then empty tuples.
        logprobs: ask for per-token log-probabilities (``logprobs=true``); they are the server's
            numbers (vLLM: of the raw model distribution by default) and ``None`` if not returned.
        client_side_stop: do not send the stop strings; cut the text after the first one here.
            For servers that drop the stop string and do not report which one matched (see below).
            The server then generates until end-of-turn or ``max_new_tokens``, and ``token_ids`` and
            ``logprobs`` of a cut reply are empty/``None`` because they no longer match the text.

    Sampling (:class:`~dialogsim.sampling.SamplingParams` → request field):
        - ``temperature``, ``top_p`` → the same fields (temperature 0 is greedy).
        - ``max_new_tokens`` → ``max_tokens`` (a number of tokens).
        - ``seeds`` → ``seed`` of each conversation's request (common random numbers: the same
          conversation with the same seed draws the same sample on servers that honour seeds, vLLM
          does); else ``seed`` → ``seed``, one per conversation from
          :func:`~dialogsim.sampling.request_seed` (``seed``, index), so a call is reproducible;
          neither sends no seed.
          A batched server is not batch-invariant: the numbers, hence seeded and even greedy
          replies, can change with what else the server batches at that moment (measured with
          vLLM 0.32 on CPU: three concurrent seeded requests reproduced each other across calls
          but one differed from the same request sent alone). For exact reproducibility send
          requests one at a time (``max_concurrency=1``) to a server that nobody else uses.
        - ``stop`` → ``stop``. Our contract keeps the matched stop string at the end of the text
          (as :class:`~dialogsim.backends.transformers_backend.TransformersBackend` does); OpenAI
          servers drop it. vLLM reports the matched string as ``stop_reason`` and it is appended
          back. Servers that report no ``stop_reason`` return the text without the stop string,
          since a ``"stop"`` finish cannot tell a stop string from end-of-turn; use
          ``client_side_stop=True`` there when the stop string matters (the user simulator's
          ``student`` template stops at ``"?"`` and parses questions ending with it).
          api.openai.com accepts at most 4 stop strings.
        - ``repetition_penalty`` → vLLM's extra field ``repetition_penalty``, sent only when it is
          not 1.0; other servers may reject (400) or ignore it.

    Raises (from ``chat``):
        ServerError: any request of the batch failed (see :class:`ServerError`); the message names
            the base URL, the model, the conversation index, what was wrong and how to fix it.

    >>> backend = OpenAIChatBackend("http://127.0.0.1:8000/v1", "smollm2")  # doctest: +SKIP
    >>> backend.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(temperature=0))  # doctest: +SKIP
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 4,
        max_concurrency: int = 16,
        return_token_ids: bool = True,
        logprobs: bool = False,
        client_side_stop: bool = False,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.return_token_ids = return_token_ids
        self.logprobs = logprobs
        self.client_side_stop = client_side_stop
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=os.environ.get(api_key_env) or PLACEHOLDER_API_KEY,
            timeout=timeout,
            max_retries=max_retries,
        )

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        """Generate one reply per conversation (see :class:`~dialogsim.backends.base.ChatBackend`).

        Raises:
            ServerError: the first failing conversation (in batch order among those that failed
                before the batch was abandoned); requests not yet sent are cancelled.
            ValueError: ``sampling.seeds`` does not hold one seed per conversation.
        """
        if not conversations:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(conversations)))
        try:
            seeds = sampling.conversation_seeds(len(conversations)) or [None] * len(conversations)
            futures: list[Future[Completion]] = [
                pool.submit(self._request, index, conversation, sampling, seed)
                for index, (conversation, seed) in enumerate(zip(conversations, seeds, strict=True))
            ]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((future for future in futures if future.done() and future.exception()), None)
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def _error(self, index: int | None, what: str, status_code: int | None = None) -> ServerError:
        where = f"{self.base_url} (model {self.model!r})"
        if index is not None:
            where += f", conversation {index}"
        return ServerError(
            f"{where}: {what}",
            base_url=self.base_url,
            model=self.model,
            conversation_index=index,
            status_code=status_code,
        )

    def _request_body(self, conversation: list[Message], sampling: SamplingParams, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": conversation,
            "n": 1,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }
        if seed is not None:
            body["seed"] = seed
        if sampling.stop and not self.client_side_stop:
            body["stop"] = list(sampling.stop)
        if self.logprobs:
            body["logprobs"] = True
        extra: dict[str, Any] = {}
        if sampling.repetition_penalty != 1.0:
            extra["repetition_penalty"] = sampling.repetition_penalty
        if self.return_token_ids:
            extra["return_token_ids"] = True
        if extra:
            body["extra_body"] = extra
        return body

    def _request(
        self, index: int, conversation: list[Message], sampling: SamplingParams, seed: int | None
    ) -> Completion:
        body = self._request_body(conversation, sampling, seed)
        retried = f"after {self.max_retries} retries" if self.max_retries else "(retries disabled)"
        try:
            raw = self._client.chat.completions.with_raw_response.create(**body)
        except openai.APITimeoutError as exc:
            raise self._error(
                index,
                f"no answer within the time-out of {self.timeout} s per attempt, {retried}. The server may be "
                "overloaded or the reply too long: raise timeout=, lower max_concurrency or max_new_tokens.",
            ) from exc
        except openai.APIConnectionError as exc:
            raise self._error(
                index,
                f"cannot connect ({_excerpt(exc.__cause__ or exc)}), {retried}. "
                "Check that the server is running and that base_url (host, port, /v1 prefix) is right.",
            ) from exc
        except openai.APIStatusError as exc:
            raise self._status_error(index, exc, retried) from exc
        text = raw.http_response.text
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise self._error(
                index,
                f"the answer is not JSON (HTTP {raw.http_response.status_code}, body {_excerpt(text)!r}). "
                "Check that base_url points at an OpenAI-compatible API, usually ending with /v1.",
                raw.http_response.status_code,
            ) from exc
        return self._completion(index, payload, sampling)

    def _status_error(self, index: int, exc: openai.APIStatusError, retried: str) -> ServerError:
        status = exc.status_code
        body = exc.body
        said = _excerpt(body["message"] if isinstance(body, dict) and "message" in body else exc.message)
        if status in (401, 403):
            key_state = "set" if os.environ.get(self.api_key_env) else f"unset, so {PLACEHOLDER_API_KEY!r} was sent"
            fix = f"Put the server's API key in the environment variable {self.api_key_env} (currently {key_state})."
            what = f"authentication refused (HTTP {status}: {said})"
        elif status == 404:
            what = f"not found (HTTP {status}: {said})"
            fix = f"Served models: {self._served_models()}; pass one as model=, and check the /v1 prefix of base_url."
        elif status in (400, 422):
            what = f"request rejected (HTTP {status}: {said})"
            fix = (
                "The prompt may exceed the server's context length (shorten it or lower max_new_tokens); servers "
                "without vLLM's extensions need return_token_ids=False and repetition_penalty=1.0."
            )
        elif status == 429:
            what = f"rate-limited (HTTP 429: {said}) {retried}"
            fix = "Lower max_concurrency or raise max_retries."
        elif status >= 500:
            what = f"server error (HTTP {status}: {said}) {retried}"
            fix = "Look at the server's log; raise max_retries if the errors are transient."
        else:
            what = f"unexpected HTTP {status} ({said})"
            fix = "Look at the server's log."
        return self._error(index, f"{what}. {fix}", status)

    def _served_models(self) -> str:
        """The server's model names (``GET /models``), or why they could not be listed."""
        try:
            listed = self._client.with_options(max_retries=0, timeout=min(self.timeout, 10.0)).models.list()
            return repr([entry.id for entry in listed.data])
        except openai.OpenAIError as exc:
            return f"unknown (GET {self.base_url}/models failed: {_excerpt(exc)})"

    def _completion(self, index: int, payload: object, sampling: SamplingParams) -> Completion:
        """A :class:`Completion` from a decoded chat-completion answer; :class:`ServerError` if malformed."""

        def malformed(what: str) -> ServerError:
            return self._error(
                index,
                f"malformed chat completion: {what} (answer {_excerpt(json.dumps(payload))}). "
                "Check that base_url points at an OpenAI-compatible chat-completions API.",
            )

        if not isinstance(payload, dict):
            raise malformed(f"expected a JSON object, got {type(payload).__name__}")
        if "error" in payload and "choices" not in payload:
            raise malformed(f"the server reported an error: {_excerpt(payload['error'])}")
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise malformed("no 'choices'")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise malformed("choice 0 has no 'message'")
        text = message.get("content")
        if text is None:
            refusal = message.get("refusal")
            raise malformed("'content' is null" + (f" (refusal: {_excerpt(refusal)})" if refusal else ""))
        if not isinstance(text, str):
            raise malformed(f"'content' must be a string, got {type(text).__name__}")
        finish_reason = choice.get("finish_reason")
        if finish_reason not in FINISH_REASONS:
            raise malformed(f"finish_reason {finish_reason!r} is not one of {FINISH_REASONS}")

        token_ids = self._ids(choice.get("token_ids"), "token_ids", malformed)
        prompt_token_ids = self._ids(payload.get("prompt_token_ids"), "prompt_token_ids", malformed)
        logprobs = self._logprobs(choice.get("logprobs"), malformed) if self.logprobs else None

        stop_reason = choice.get("stop_reason")  # vLLM: the matched stop string, a stop token id, or null
        if finish_reason == "stop" and isinstance(stop_reason, str) and stop_reason in sampling.stop:
            text += stop_reason
        elif self.client_side_stop and sampling.stop:
            cut = min((text.find(s) + len(s) for s in sampling.stop if s in text), default=None)
            if cut is not None:
                text, finish_reason, token_ids, logprobs = text[:cut], "stop", (), None
        return Completion(
            text=text,
            token_ids=token_ids,
            prompt_token_ids=prompt_token_ids,
            finish_reason=finish_reason,
            logprobs=logprobs,
        )

    @staticmethod
    def _ids(value: object, field: str, malformed: Callable[[str], ServerError]) -> tuple[int, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(token, int) for token in value):
            raise malformed(f"'{field}' must be a list of integers")
        return tuple(value)

    @staticmethod
    def _logprobs(value: object, malformed: Callable[[str], ServerError]) -> tuple[float, ...] | None:
        if value is None:
            return None
        content = value.get("content") if isinstance(value, dict) else None
        if content is None:
            return None
        try:
            return tuple(float(entry["logprob"]) for entry in content)
        except (TypeError, KeyError, ValueError) as exc:
            raise malformed("'logprobs.content' entries must hold a numeric 'logprob'") from exc
