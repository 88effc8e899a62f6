"""OpenAIChatBackend against real HTTP servers.

(a) ``vllm``-marked tests start a real vLLM OpenAI-compatible server with the shipped SmolLM2 model.
(b) The other tests run a small standard-library HTTP server whose answers are scripted (errors,
garbage, slow answers, a valid chat completion): the backend is under test, the server is its
environment. They need no model and run in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.backends.factory import build_backend
from dialogsim.backends.openai_backend import OpenAIChatBackend, ServerError
from dialogsim.messages import Message
from dialogsim.sampling import SamplingParams, request_seed

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


def conversation(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------------------
# (b) A scripted chat-completions server: http://127.0.0.1:<port>/<scenario>/<run id>/v1
# --------------------------------------------------------------------------------------------------


@dataclass
class ScriptedServer:
    """State shared with the request handler: requests seen per run id, in-flight counter."""

    port: int = 0
    requests: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    max_in_flight: int = 0

    def url(self, scenario: str) -> tuple[str, str]:
        """A fresh ``(base_url, run_id)`` for ``scenario``; per-run state starts empty."""
        run_id = uuid.uuid4().hex[:8]
        return f"http://127.0.0.1:{self.port}/{scenario}/{run_id}/v1", run_id


def chat_completion(content: str | None, finish_reason: str = "stop", **choice_extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": "m", "choices": [choice | choice_extra]}


MALFORMED = ("garbage", "badjson", "nochoices", "nullcontent")


def make_handler(state: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (time-out test)
                self.wfile.write(body)

        def send_json(self, status: int, payload: object) -> None:
            self.send(status, json.dumps(payload).encode())

        def do_GET(self) -> None:
            if self.path.endswith("/v1/models"):
                self.send_json(200, {"object": "list", "data": [{"id": "served-model", "object": "model"}]})
            else:
                self.send_json(404, {"error": {"message": "no such route"}})

        def do_POST(self) -> None:
            _, scenario, run_id, *_ = self.path.split("/")
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            request["authorization"] = self.headers.get("Authorization")
            with state.lock:
                state.requests[run_id].append(request)
                attempt = len(state.requests[run_id])
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self.answer(scenario, attempt, request)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def answer(self, scenario: str, attempt: int, request: dict[str, Any]) -> None:
            last = request["messages"][-1]["content"]
            if scenario == "echo":  # reply = last user message; later conversations answer first
                time.sleep(0.05 * (8 - int(last.split()[-1])) if last.startswith("number") else 0)
                self.send_json(200, chat_completion(f"echo: {last}", token_ids=[1, 2], prompt_token_ids=None))
            elif scenario == "flaky":  # two 500s, then a valid answer
                if attempt <= 2:
                    self.send_json(500, {"error": {"message": f"engine hiccup {attempt}"}})
                else:
                    self.send_json(200, chat_completion("recovered"))
            elif scenario == "always500":
                self.send_json(500, {"error": {"message": "engine dead"}})
            elif scenario in MALFORMED and last == "ok":  # the first conversation of the batch gets a valid answer
                self.send_json(200, chat_completion("fine"))
            elif scenario == "garbage":
                self.send(200, b"<html>this is not an API</html>", "text/html")
            elif scenario == "badjson":
                self.send(200, b'{"choices": [', "application/json")
            elif scenario == "nochoices":
                self.send_json(200, {"id": "x", "object": "chat.completion", "choices": []})
            elif scenario == "nullcontent":
                answer = chat_completion(None)
                answer["choices"][0]["message"]["refusal"] = "I cannot help with that"
                self.send_json(200, answer)
            elif scenario == "slow":
                time.sleep(3.0)
                self.send_json(200, chat_completion("too late"))
            elif scenario == "nomodel":
                self.send_json(404, {"error": {"message": f"The model `{request['model']}` does not exist."}})
            elif scenario == "auth":
                self.send_json(401, {"error": {"message": "invalid api key"}})
            elif scenario == "vllmstop":  # vLLM drops the stop string and reports it as stop_reason
                self.send_json(200, chat_completion("What is 2 + 2", stop_reason="?", token_ids=[5, 6, 7]))
            elif scenario == "nostopreason":  # a server that ignores stop strings and reports nothing
                self.send_json(200, chat_completion("Why is that? Because. And more?", token_ids=[5, 6, 7]))
            elif scenario == "logprobs":
                logprobs = {"content": [{"token": "a", "logprob": -0.5, "top_logprobs": []}]}
                self.send_json(200, chat_completion("a", logprobs=logprobs, token_ids=[9], prompt_token_ids=None))
            else:
                self.send_json(400, {"error": {"message": f"unknown scenario {scenario}"}})

    return Handler


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedServer]:
    state = ScriptedServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_is_a_chat_backend_and_factory_builds_it() -> None:
    backend = build_backend("openai", "some-model", base_url="http://127.0.0.1:9/v1")
    assert isinstance(backend, OpenAIChatBackend) and isinstance(backend, ChatBackend)
    assert backend.chat([], GREEDY) == []
    with pytest.raises(ValueError, match="http"):
        OpenAIChatBackend("127.0.0.1:8000/v1", "m")


def test_request_fields_follow_sampling_params(scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIALOGSIM_TEST_KEY", "secret-key")
    base_url, run_id = scripted.url("echo")
    backend = OpenAIChatBackend(base_url, "m", api_key_env="DIALOGSIM_TEST_KEY")
    sampling = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=33, stop=("?", "\n\n"), seed=5)
    backend.chat([conversation("a"), conversation("b")], sampling)
    backend.chat([conversation("c")], sampling.with_seed(None))
    backend.chat([conversation("d")], SamplingParams(repetition_penalty=1.2))
    first, second, unseeded, penalised = sorted(scripted.requests[run_id], key=lambda r: r["messages"][0]["content"])
    assert first["temperature"] == 0.7 and first["top_p"] == 0.9 and first["max_tokens"] == 33
    assert first["stop"] == ["?", "\n\n"] and first["n"] == 1 and first["model"] == "m"
    assert (first["seed"], second["seed"]) == (request_seed(5, 0), request_seed(5, 1))
    assert first["seed"] != second["seed"] and request_seed(5, 1) != request_seed(6, 0)
    assert "seed" not in unseeded
    assert "repetition_penalty" not in first and penalised["repetition_penalty"] == 1.2
    assert first["return_token_ids"] is True
    assert first["authorization"] == "Bearer secret-key"
    monkeypatch.delenv("DIALOGSIM_TEST_KEY")
    base_url, run_id = scripted.url("echo")
    OpenAIChatBackend(base_url, "m", api_key_env="DIALOGSIM_TEST_KEY", return_token_ids=False).chat(
        [conversation("e")], GREEDY
    )
    assert scripted.requests[run_id][0]["authorization"] == "Bearer EMPTY"  # placeholder for servers without auth
    assert "return_token_ids" not in scripted.requests[run_id][0]


def test_batch_runs_concurrently_and_keeps_order(scripted: ScriptedServer) -> None:
    base_url, _ = scripted.url("echo")
    backend = OpenAIChatBackend(base_url, "m", max_concurrency=4)
    scripted.max_in_flight = 0
    completions = backend.chat([conversation(f"number {i}") for i in range(8)], GREEDY)
    assert [c.text for c in completions] == [f"echo: number {i}" for i in range(8)]
    assert all(c.finish_reason == "stop" and c.token_ids == (1, 2) and c.prompt_token_ids == () for c in completions)
    assert scripted.max_in_flight == 4  # concurrent up to the limit, never beyond


def test_retries_5xx_then_succeeds(scripted: ScriptedServer) -> None:
    base_url, run_id = scripted.url("flaky")
    completion = OpenAIChatBackend(base_url, "m", max_retries=3).chat([conversation("hi")], GREEDY)[0]
    assert completion == Completion(text="recovered", token_ids=(), prompt_token_ids=(), finish_reason="stop")
    assert len(scripted.requests[run_id]) == 3


def test_persistent_5xx_raises_after_retries(scripted: ScriptedServer) -> None:
    base_url, run_id = scripted.url("always500")
    backend = OpenAIChatBackend(base_url, "m", max_retries=2)
    with pytest.raises(ServerError, match=r"HTTP 500.*engine dead.*after 2 retries") as caught:
        backend.chat([conversation("hi")], GREEDY)
    assert base_url in str(caught.value) and "'m'" in str(caught.value) and "conversation 0" in str(caught.value)
    assert caught.value.status_code == 500 and caught.value.conversation_index == 0
    assert len(scripted.requests[run_id]) == 3


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("garbage", r"not JSON.*this is not an API.*/v1"),
        ("badjson", r"not JSON"),
        ("nochoices", r"malformed chat completion: no 'choices'"),
        ("nullcontent", r"'content' is null \(refusal: I cannot help with that\)"),
    ],
)
def test_malformed_answer_raises_without_retry(scripted: ScriptedServer, scenario: str, expected: str) -> None:
    base_url, run_id = scripted.url(scenario)
    with pytest.raises(ServerError, match=expected) as caught:
        OpenAIChatBackend(base_url, "m", max_retries=3).chat([conversation("ok"), conversation("bad")], GREEDY)
    assert base_url in str(caught.value) and "conversation 1" in str(caught.value)
    assert caught.value.conversation_index == 1
    bad_requests = [r for r in scripted.requests[run_id] if r["messages"][-1]["content"] == "bad"]
    assert len(bad_requests) == 1  # a malformed answer is not retried
    # (the "ok" request runs concurrently and may still be in flight when the batch is abandoned)


def test_timeout_raises_within_bounded_time(scripted: ScriptedServer) -> None:
    base_url, run_id = scripted.url("slow")
    backend = OpenAIChatBackend(base_url, "m", timeout=0.3, max_retries=1)
    started = time.perf_counter()
    with pytest.raises(ServerError, match=r"time-out of 0.3 s per attempt, after 1 retries"):
        backend.chat([conversation("hi")], GREEDY)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.5, f"took {elapsed:.2f} s; the server answers after 3 s"
    assert len(scripted.requests[run_id]) == 2


def test_client_errors_fail_fast_with_a_fix(scripted: ScriptedServer) -> None:
    base_url, run_id = scripted.url("nomodel")
    with pytest.raises(ServerError, match=r"HTTP 404.*does not exist.*Served models: \['served-model'\]"):
        OpenAIChatBackend(base_url, "wrong-model", max_retries=3).chat([conversation("hi")], GREEDY)
    assert len(scripted.requests[run_id]) == 1
    base_url, _ = scripted.url("auth")
    with pytest.raises(ServerError, match=r"HTTP 401.*environment variable NO_SUCH_KEY_VAR \(currently unset"):
        OpenAIChatBackend(base_url, "m", api_key_env="NO_SUCH_KEY_VAR").chat([conversation("hi")], GREEDY)


def test_connection_refused_names_the_url() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=0)
    with pytest.raises(ServerError, match=rf"127.0.0.1:{port}/v1.*cannot connect"):
        backend.chat([conversation("hi")], GREEDY)


def test_stop_string_is_kept_in_the_text(scripted: ScriptedServer) -> None:
    sampling = SamplingParams(temperature=0.0, stop=("?",))
    base_url, _ = scripted.url("vllmstop")
    completion = OpenAIChatBackend(base_url, "m").chat([conversation("q")], sampling)[0]
    assert (completion.text, completion.finish_reason, completion.token_ids) == ("What is 2 + 2?", "stop", (5, 6, 7))
    base_url, _ = scripted.url("nostopreason")
    server_side = OpenAIChatBackend(base_url, "m").chat([conversation("q")], sampling)[0]
    assert server_side.text == "Why is that? Because. And more?"  # the server ignored the stop: left as is
    base_url, run_id = scripted.url("nostopreason")
    client_side = OpenAIChatBackend(base_url, "m", client_side_stop=True).chat([conversation("q")], sampling)[0]
    assert (client_side.text, client_side.finish_reason, client_side.token_ids) == ("Why is that?", "stop", ())
    assert "stop" not in scripted.requests[run_id][0]


def test_logprobs_are_returned_when_asked(scripted: ScriptedServer) -> None:
    base_url, run_id = scripted.url("logprobs")
    completion = OpenAIChatBackend(base_url, "m", logprobs=True).chat([conversation("q")], GREEDY)[0]
    assert completion.logprobs == (-0.5,) and completion.token_ids == (9,)
    assert scripted.requests[run_id][0]["logprobs"] is True


# --------------------------------------------------------------------------------------------------
# (a) A real vLLM OpenAI-compatible server with the shipped SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------------

SERVED_NAME = "smollm2"
STARTUP_DEADLINE_S = 180.0


@dataclass
class VLLMServer:
    base_url: str
    model_path: str
    startup_s: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def vllm_server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"`import vllm` fails, so no vLLM server can start: {probe.stderr.strip()[-300:]}")
    port = free_port()
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", smollm2_path, "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--max-model-len", "2048",
    ]  # fmt: skip
    log_dir = tmp_path_factory.mktemp("vllm-server")
    stdout_path, stderr_path = log_dir / "stdout.log", log_dir / "stderr.log"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
    started = time.perf_counter()
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited with code {process.returncode}; stderr tail:\n{tail(stderr_path)}")
            if time.perf_counter() - started > STARTUP_DEADLINE_S:
                pytest.fail(f"vLLM server not healthy after {STARTUP_DEADLINE_S} s; stderr tail:\n{tail(stderr_path)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        startup_s = time.perf_counter() - started
        print(f"\nvLLM server healthy after {startup_s:.1f} s (logs in {log_dir})")
        yield VLLMServer(f"http://127.0.0.1:{port}/v1", smollm2_path, startup_s)
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it spawns an engine core process), then SIGKILL."""
    for sig, grace_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            os.killpg(process.pid, 0)  # children of the group may outlive the leader
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def served(vllm_server: VLLMServer) -> OpenAIChatBackend:
    return OpenAIChatBackend(vllm_server.base_url, SERVED_NAME, timeout=120.0)


QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Write one sentence about the sea.",
]


@pytest.mark.vllm
def test_vllm_greedy_returns_real_text_and_ids(served: OpenAIChatBackend, vllm_server: VLLMServer) -> None:
    from dialogsim.backends.transformers_backend import chat_prompt_ids, load_tokenizer

    sampling = SamplingParams(temperature=0.0, max_new_tokens=48)
    started = time.perf_counter()
    first = served.chat([conversation(QUESTIONS[0])], sampling)[0]
    print(f"\none greedy request, {len(first.token_ids)} tokens: {time.perf_counter() - started:.2f} s")
    assert first.text.strip()  # near-ties: vLLM's bf16 greedy reply need not match TransformersBackend's
    assert first.finish_reason in ("stop", "length") and first.token_ids
    tokenizer = load_tokenizer(vllm_server.model_path)
    assert list(first.prompt_token_ids) == chat_prompt_ids(tokenizer, conversation(QUESTIONS[0]))
    assert tokenizer.decode(first.token_ids, skip_special_tokens=True) == first.text
    assert served.chat([conversation(QUESTIONS[0])], sampling)[0] == first  # greedy is deterministic


@pytest.mark.vllm
def test_vllm_batch_order_is_preserved(served: OpenAIChatBackend, vllm_server: VLLMServer) -> None:
    from dialogsim.backends.transformers_backend import chat_prompt_ids, load_tokenizer

    tokenizer = load_tokenizer(vllm_server.model_path)
    conversations = [conversation(question) for question in QUESTIONS]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=32)
    started = time.perf_counter()
    batch = served.chat(conversations, sampling)
    print(f"\nbatch of {len(batch)} greedy requests (32 tokens max): {time.perf_counter() - started:.2f} s")
    for completion, messages in zip(batch, conversations, strict=True):  # the prompt ids name the conversation
        assert list(completion.prompt_token_ids) == chat_prompt_ids(tokenizer, messages)
        assert completion.text.strip() and completion.token_ids
    assert len({completion.text for completion in batch}) == len(QUESTIONS)


@pytest.mark.vllm
def test_vllm_seed_makes_sampling_reproducible(vllm_server: VLLMServer) -> None:
    # One request at a time: vLLM on CPU is not batch-invariant, so concurrent requests can change each other.
    backend = OpenAIChatBackend(vllm_server.base_url, SERVED_NAME, timeout=120.0, max_concurrency=1)
    conversations = [conversation(QUESTIONS[3])] * 3
    sampling = SamplingParams(temperature=0.8, max_new_tokens=32, seed=7)
    first = [completion.text for completion in backend.chat(conversations, sampling)]
    again = [completion.text for completion in backend.chat(conversations, sampling)]
    other = [completion.text for completion in backend.chat(conversations, sampling.with_seed(8))]
    assert first == again  # vLLM honours the per-request seed
    assert len(set(first)) > 1  # same conversation, different per-conversation seeds
    assert other != first


@pytest.mark.vllm
def test_vllm_stop_string_is_kept_and_length_finish(served: OpenAIChatBackend) -> None:
    messages = conversation(QUESTIONS[3])
    free = served.chat([messages], SamplingParams(temperature=0.0, max_new_tokens=48))[0]
    stop = free.text.split()[3]  # a word in the middle of the greedy reply
    stopped = served.chat([messages], SamplingParams(temperature=0.0, max_new_tokens=48, stop=(stop,)))[0]
    assert stopped.text == free.text[: free.text.index(stop) + len(stop)]
    assert stopped.finish_reason == "stop"
    capped = served.chat([messages], SamplingParams(temperature=0.0, max_new_tokens=5))[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) == 5
    assert free.text.startswith(capped.text)


@pytest.mark.vllm
def test_vllm_logprobs_and_unknown_model(vllm_server: VLLMServer) -> None:
    backend = OpenAIChatBackend(vllm_server.base_url, SERVED_NAME, logprobs=True)
    completion = backend.chat([conversation(QUESTIONS[1])], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
    assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)
    assert all(value <= 0.0 for value in completion.logprobs)
    with pytest.raises(ServerError, match=r"HTTP 404.*Served models: \['smollm2'\]"):
        OpenAIChatBackend(vllm_server.base_url, "no-such-model").chat([conversation("hi")], GREEDY)


@pytest.mark.vllm
def test_vllm_backs_the_user_simulator(served: OpenAIChatBackend) -> None:
    from dialogsim.user import UserSimulator

    dialogues: list[list[Message]] = [
        [
            {"role": "user", "content": "What is 12 times 7?"},
            {"role": "assistant", "content": "12 times 7 is 84."},
        ],
        [
            {"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": "Because air scatters blue light more than red light."},
        ],
    ]
    simulator = UserSimulator(served, "student")
    started = time.perf_counter()
    turns = simulator.next_questions(dialogues, seed=0)
    print(f"\nuser simulator, 2 dialogues: {time.perf_counter() - started:.2f} s, parse rate {simulator.parse_rate}")
    print([turn.text for turn in turns])
    assert len(turns) == 2
    assert all(turn.text.strip().endswith("?") for turn in turns)
    # No reproducibility check here: requests sent concurrently share vLLM batches, and vLLM's CPU
    # kernels give batch-dependent results (test_vllm_seed_makes_sampling_reproducible sends one at a time).
