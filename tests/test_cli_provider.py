"""providers/cli.py: the claude / codex / cursor-agent providers, run against fake tools.

The fakes (tests/fake_cli/) print the real tools' JSON event lines and record what they were
given; the prompt text picks their behaviour (see tests/fake_cli/_fake.py). Each tool is reached
through a small wrapper script made per test, which tells the fake where to write its record:
the provider passes the child only a minimal environment, so the record path cannot travel in
an ordinary variable of the test's own environment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import is_gone, run_async

from evo_gateway import GatewayError, RequestContext
from providers.cli import (
    ClaudeCodeProvider,
    ClaudeEventParser,
    CodexCliProvider,
    CodexEventParser,
    CursorEventParser,
    CursorProvider,
    _Gate,
    render_prompt,
)

FAKE_DIR = Path(__file__).parent / "fake_cli"
DATA_DIR = Path(__file__).parent / "data" / "cli"


# name, class, fake script, binary env, timeout env, content, usage
TOOLS = {
    "claude_code": (ClaudeCodeProvider, "claude", "CLAUDE_CODE_BINARY", "CLAUDE_CODE_TIMEOUT_SECS",
                    "Let me check.\n\nThe answer is 42.",
                    {"prompt_tokens": 15, "completion_tokens": 7, "total_tokens": 22,
                     "prompt_tokens_details": {"cached_tokens": 3}}),
    "codex_cli": (CodexCliProvider, "codex", "CODEX_CLI_BINARY", "CODEX_CLI_TIMEOUT_SECS",
                  "Let me check.\n\nThe answer is 42.",
                  {"prompt_tokens": 100, "completion_tokens": 9, "total_tokens": 109,
                   "prompt_tokens_details": {"cached_tokens": 40}}),
    "cursor": (CursorProvider, "cursor-agent", "CURSOR_AGENT_BINARY", "CURSOR_TIMEOUT_SECS",
               "Let me check. The answer is 42.",
               {"prompt_tokens": 24, "completion_tokens": 6, "total_tokens": 30,
                "prompt_tokens_details": {"cached_tokens": 4}}),
}


class Harness:
    """A provider wired to a fake tool, plus what the fake recorded."""

    def __init__(self, tmp_path: Path, kind: str, **env: str) -> None:
        cls, script, binary_env, _, self.content, self.usage = TOOLS[kind]
        self.record_path = tmp_path / "record.jsonl"
        self.release_path = tmp_path / "release"
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
        wrapper = bindir / script
        wrapper.write_text(f'#!/bin/sh\nFAKE_CLI_RECORD="{self.record_path}" FAKE_CLI_RELEASE="{self.release_path}" '
                           f'exec "{FAKE_DIR / script}" "$@"\n')
        wrapper.chmod(0o755)
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
                   binary_env: str(wrapper), "OPENAI_API_KEY": "sk-parent-secret",
                   "ANTHROPIC_API_KEY": "sk-ant-parent-secret", "OPENROUTER_API_KEY": "sk-or-secret",
                   "CLAUDE_CONFIG_DIR": str(tmp_path / "claude-config"), "CODEX_HOME": str(tmp_path / "codex-home"),
                   "CURSOR_API_KEY": "cursor-key"}
        environ.update(env)
        self.kind = kind
        self.provider = cls(SimpleNamespace(name=kind.replace("_", "-"), provider_type=kind, models=[]), environ)

    def records(self) -> list[dict]:
        if not self.record_path.exists():
            return []
        return [json.loads(line) for line in self.record_path.read_text().splitlines() if line.strip()]

    async def wait_records(self, count: int = 1, timeout_s: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.records()) < count:
            assert time.monotonic() < deadline, "the fake tool never started"
            await asyncio.sleep(0.02)
        return self.records()


def body(prompt: str = "What is the answer?", *, stream: bool = False, model: str = "") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}


def ctx() -> RequestContext:
    return RequestContext("req-test", {})


async def collect(stream) -> list[dict]:
    return [chunk async for chunk in stream]


async def wait_gone(*pids: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(is_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if not is_gone(p)]}"
        await asyncio.sleep(0.05)


def content_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def text_chunks(chunks: list[dict]) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks
            if c["choices"] and c["choices"][0]["delta"].get("content")]


# ---------------------------------------------------------------------------------------------
# answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TOOLS))
@run_async
async def test_non_stream_answer_has_content_and_usage(tmp_path, kind):
    h = Harness(tmp_path, kind)
    c = ctx()
    result = await h.provider.chat(body(model="some-model"), c)
    assert result["object"] == "chat.completion"
    assert result["id"].startswith("chatcmpl-")
    assert isinstance(result["created"], int)
    assert result["model"] == "some-model"
    assert result["choices"][0]["message"] == {"role": "assistant", "content": h.content}
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["usage"] == h.usage
    assert c.log["usage"] == h.usage
    if kind == "claude_code":
        assert c.log["cost_usd"] == pytest.approx(0.0123)
    assert h.provider.running == 0


@pytest.mark.parametrize("kind", sorted(TOOLS))
@run_async
async def test_stream_answer_arrives_in_several_chunks_then_stop_then_usage(tmp_path, kind):
    h = Harness(tmp_path, kind)
    stream = await h.provider.chat(body(stream=True, model="m1"), ctx())
    chunks = await collect(stream)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(text_chunks(chunks)) >= 3
    assert content_of(chunks) == h.content
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == h.usage
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m1" and isinstance(c["created"], int)
               for c in chunks)
    assert h.provider.running == 0


@run_async
async def test_claude_stream_skips_subagent_text_and_non_json_lines(tmp_path):
    h = Harness(tmp_path, "claude_code")
    chunks = await collect(await h.provider.chat(body(stream=True), ctx()))
    assert "SUBAGENT" not in content_of(chunks)
    assert "debug" not in content_of(chunks)


@pytest.mark.parametrize("mode", ["stream", "plain"])
@run_async
async def test_codex_old_id_msg_format_is_parsed(tmp_path, mode):
    h = Harness(tmp_path, "codex_cli")
    expected_usage = {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55,
                      "prompt_tokens_details": {"cached_tokens": 10}}
    if mode == "stream":
        chunks = await collect(await h.provider.chat(body("OLDFORMAT please", stream=True), ctx()))
        assert text_chunks(chunks) == ["The ", "answer ", "is 42."]
        assert chunks[-1]["usage"] == expected_usage
    else:
        result = await h.provider.chat(body("OLDFORMAT please"), ctx())
        assert result["choices"][0]["message"]["content"] == "The answer is 42."
        assert result["usage"] == expected_usage


# ---------------------------------------------------------------------------------------------
# how the prompt and flags reach the tool
# ---------------------------------------------------------------------------------------------

EXPECTED_ARGV = {
    "claude_code": ["-p", "--output-format", "stream-json", "--verbose", "--model", "opus"],
    "codex_cli": ["exec", "--json", "-m", "opus", "--skip-git-repo-check", "--sandbox", "read-only", "-"],
}


@pytest.mark.parametrize("kind", ["claude_code", "codex_cli"])
@pytest.mark.parametrize("prompt", ["plain question", "--help -p looks like flags\nsecond line"])
@run_async
async def test_prompt_goes_on_stdin_and_nowhere_else(tmp_path, kind, prompt):
    h = Harness(tmp_path, kind)
    result = await h.provider.chat(body(prompt, model="opus"), ctx())
    assert result["choices"][0]["message"]["content"] == h.content
    (rec,) = h.records()
    assert rec["stdin"] == prompt
    assert rec["argv"] == EXPECTED_ARGV[kind]           # exactly the flags: the prompt is in no argument


@pytest.mark.parametrize("prompt", ["plain question", "--help -p looks like flags"])
@run_async
async def test_cursor_prompt_follows_double_dash(tmp_path, prompt):
    h = Harness(tmp_path, "cursor")
    result = await h.provider.chat(body(prompt, model="gpt-5"), ctx())
    assert result["choices"][0]["message"]["content"] == h.content
    (rec,) = h.records()
    assert rec["argv"] == ["-p", "--output-format", "stream-json", "--stream-partial-output", "--trust",
                           "--mode", "ask", "--model", "gpt-5", "--", prompt]
    assert rec["stdin"] == ""


@pytest.mark.parametrize("kind", sorted(TOOLS))
@pytest.mark.parametrize("model", ["", "default"])
@run_async
async def test_default_model_omits_the_model_flag(tmp_path, kind, model):
    h = Harness(tmp_path, kind)
    await h.provider.chat(body(model=model), ctx())
    argv = h.records()[0]["argv"]
    assert "--model" not in argv and "-m" not in argv


@run_async
async def test_model_that_looks_like_a_flag_is_refused(tmp_path):
    h = Harness(tmp_path, "claude_code")
    with pytest.raises(GatewayError) as info:
        await h.provider.chat(body(model="--dangerously-skip-permissions"), ctx())
    assert info.value.status == 400
    assert h.records() == []


@pytest.mark.parametrize("kind", sorted(TOOLS))
@run_async
async def test_child_environment_is_minimal_and_keeps_only_its_own_auth(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-in-the-real-environment")
    h = Harness(tmp_path, kind, EXTRA_UNRELATED="x", LC_ALL="C.UTF-8")
    await h.provider.chat(body(), ctx())
    env = h.records()[0]["env"]
    for secret in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENROUTER_API_KEY", "EXTRA_UNRELATED"):
        assert secret not in env
    assert env["HOME"] == str(tmp_path) and env["LC_ALL"] == "C.UTF-8" and "PATH" in env
    own = {"claude_code": {"CLAUDE_CONFIG_DIR"}, "codex_cli": {"CODEX_HOME"}, "cursor": {"CURSOR_API_KEY"}}[kind]
    for name in ("CLAUDE_CONFIG_DIR", "CLAUDE_CODE_OAUTH_TOKEN", "CODEX_HOME", "CURSOR_API_KEY"):
        assert (name in env) == (name in own and name != "CLAUDE_CODE_OAUTH_TOKEN")


@pytest.mark.parametrize("kind", sorted(TOOLS))
@run_async
async def test_each_run_has_its_own_scratch_dir_removed_afterwards(tmp_path, kind):
    h = Harness(tmp_path, kind)
    await h.provider.chat(body(), ctx())
    await collect(await h.provider.chat(body(stream=True), ctx()))
    first, second = h.records()
    assert first["cwd"] != second["cwd"] and first["cwd"] != os.getcwd()
    assert not os.path.exists(first["cwd"]) and not os.path.exists(second["cwd"])
    assert first["pgid"] == first["pid"]            # its own process group


# ---------------------------------------------------------------------------------------------
# timeout, cancellation, closing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TOOLS))
@run_async
async def test_timeout_is_504_and_kills_the_tool_and_its_grandchild(tmp_path, kind):
    h = Harness(tmp_path, kind, **{TOOLS[kind][3]: "1"})
    started = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await h.provider.chat(body("SLEEP forever"), ctx())
    assert info.value.status == 504
    assert time.monotonic() - started < 5
    (rec,) = h.records()
    await wait_gone(rec["pid"], rec["grandchild"])
    assert not os.path.exists(rec["cwd"])
    assert h.provider.running == 0


@run_async
async def test_timeout_mid_stream_raises_504_after_the_first_text(tmp_path):
    h = Harness(tmp_path, "codex_cli", CODEX_CLI_TIMEOUT_SECS="1")
    stream = await h.provider.chat(body("SLEEP forever", stream=True), ctx())
    seen = []
    with pytest.raises(GatewayError) as info:
        async for chunk in stream:
            seen.append(chunk)
    assert info.value.status == 504
    assert content_of(seen) == "Let me check."
    (rec,) = h.records()
    await wait_gone(rec["pid"], rec["grandchild"])


@pytest.mark.parametrize("kind", sorted(TOOLS))
@run_async
async def test_cancelling_a_stream_consumer_kills_the_process_group(tmp_path, kind):
    h = Harness(tmp_path, kind)
    got_text = asyncio.Event()

    async def consume():
        async for chunk in await h.provider.chat(body("SLEEP after a little text", stream=True), ctx()):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                got_text.set()

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(got_text.wait(), 10)
    (rec,) = await h.wait_records()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_gone(rec["pid"], rec["grandchild"])
    assert not os.path.exists(rec["cwd"])
    assert h.provider.running == 0


@run_async
async def test_cancelling_a_non_stream_request_kills_the_process_group(tmp_path):
    h = Harness(tmp_path, "claude_code")
    task = asyncio.ensure_future(h.provider.chat(body("SLEEP"), ctx()))
    (rec,) = await h.wait_records()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_gone(rec["pid"], rec["grandchild"])
    assert h.provider.running == 0


@run_async
async def test_closing_a_stream_early_kills_and_cleans_up(tmp_path):
    h = Harness(tmp_path, "cursor")
    stream = await h.provider.chat(body("SLEEP", stream=True), ctx())
    assert (await stream.__anext__())["choices"][0]["delta"]["role"] == "assistant"
    assert (await stream.__anext__())["choices"][0]["delta"]["content"]
    (rec,) = h.records()
    await stream.aclose()
    await wait_gone(rec["pid"], rec["grandchild"])
    assert not os.path.exists(rec["cwd"]) and h.provider.running == 0


@run_async
async def test_closing_a_stream_that_was_never_iterated_releases_its_slot(tmp_path):
    h = Harness(tmp_path, "claude_code", CLAUDE_CODE_MAX_CONCURRENT="1")
    stream = await h.provider.chat(body("SLEEP", stream=True), ctx())
    assert h.provider.running == 1
    (rec,) = await h.wait_records()
    await stream.aclose()
    await wait_gone(rec["pid"], rec["grandchild"])
    assert h.provider.running == 0
    result = await h.provider.chat(body(), ctx())       # the slot is free again
    assert result["choices"][0]["message"]["content"] == h.content


@run_async
async def test_provider_aclose_kills_running_children(tmp_path):
    h = Harness(tmp_path, "codex_cli")
    task = asyncio.ensure_future(h.provider.chat(body("SLEEP"), ctx()))
    (rec,) = await h.wait_records()
    await h.provider.aclose()
    await wait_gone(rec["pid"], rec["grandchild"])
    with pytest.raises(GatewayError) as info:
        await task
    assert info.value.status == 502
    assert h.provider.running == 0


# ---------------------------------------------------------------------------------------------
# concurrency cap and queue
# ---------------------------------------------------------------------------------------------


@run_async
async def test_cap_one_queue_one_second_waits_third_gets_429(tmp_path):
    h = Harness(tmp_path, "claude_code", CLAUDE_CODE_MAX_CONCURRENT="1")
    assert h.provider.queue_limit == 1
    first = asyncio.ensure_future(h.provider.chat(body("WAITFILE"), ctx()))
    await h.wait_records(1)
    second = asyncio.ensure_future(h.provider.chat(body(), ctx()))
    while h.provider.waiting != 1:
        await asyncio.sleep(0.01)
    with pytest.raises(GatewayError) as info:
        await h.provider.chat(body(), ctx())
    assert info.value.status == 429
    assert "CLAUDE_CODE_MAX_CONCURRENT" in info.value.message
    h.release_path.touch()
    for task in (first, second):
        assert (await asyncio.wait_for(task, 10))["choices"][0]["message"]["content"] == h.content
    assert h.provider.running == 0 and h.provider.waiting == 0


@run_async
async def test_queued_request_gets_429_after_the_wait_limit(tmp_path):
    h = Harness(tmp_path, "cursor", CURSOR_MAX_CONCURRENT="1")
    h.provider.queue_wait_s = 0.2
    first = asyncio.ensure_future(h.provider.chat(body("WAITFILE", stream=True), ctx()))
    stream = await first
    await h.wait_records(1)
    started = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await h.provider.chat(body(), ctx())
    assert info.value.status == 429 and 0.15 < time.monotonic() - started < 2
    h.release_path.touch()
    assert content_of(await collect(stream)) == h.content


@run_async
async def test_gate_passes_a_slot_on_when_a_granted_waiter_is_cancelled():
    gate = _Gate()
    await gate.acquire(1, 2, 5, "busy")
    waiter = asyncio.ensure_future(gate.acquire(1, 2, 5, "busy"))
    second = asyncio.ensure_future(gate.acquire(1, 2, 5, "busy"))
    await asyncio.sleep(0)
    gate.release()                      # granted to `waiter` ...
    waiter.cancel()                     # ... which is cancelled before it runs: `second` gets it
    await asyncio.wait_for(second, 1)
    assert gate.active == 1 and gate.waiting == 0


# ---------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TOOLS))
@run_async
async def test_non_zero_exit_is_502_without_stderr_in_the_message(tmp_path, kind, caplog):
    h = Harness(tmp_path, kind)
    with caplog.at_level(logging.WARNING, logger="evo_gateway"), pytest.raises(GatewayError) as info:
        await h.provider.chat(body("FAIL"), ctx())
    assert info.value.status == 502
    assert "exited with status 1" in info.value.message
    assert "SECRET_STDERR_DETAIL" not in info.value.message
    assert "SECRET_STDERR_DETAIL" in caplog.text
    assert not os.path.exists(h.records()[0]["cwd"])


@pytest.mark.parametrize("kind", sorted(TOOLS))
@run_async
async def test_non_zero_exit_mid_stream_raises_after_the_text(tmp_path, kind):
    h = Harness(tmp_path, kind)
    seen = []
    with pytest.raises(GatewayError) as info:
        async for chunk in await h.provider.chat(body("FAIL", stream=True), ctx()):
            seen.append(chunk)
    assert info.value.status == 502 and "SECRET" not in info.value.message
    assert content_of(seen) == "Let me check."
    assert not any(c["choices"] and c["choices"][0]["finish_reason"] for c in seen)
    assert h.provider.running == 0


ERROR_TEXT = {"claude_code": "API Error: 529 overloaded", "codex_cli": "stream disconnected before completion",
              "cursor": "usage limit reached"}


@pytest.mark.parametrize("kind", sorted(TOOLS))
@pytest.mark.parametrize("stream", [False, True])
@run_async
async def test_tool_reported_error_is_502_with_its_message(tmp_path, kind, stream):
    h = Harness(tmp_path, kind)
    seen = []
    with pytest.raises(GatewayError) as info:
        result = await h.provider.chat(body("ISERROR", stream=stream), ctx())
        if stream:
            async for chunk in result:
                seen.append(chunk)
    assert info.value.status == 502
    assert ERROR_TEXT[kind] in info.value.message
    if stream:
        assert content_of(seen) == "Let me check."


@pytest.mark.parametrize("kind", sorted(TOOLS))
@run_async
async def test_exit_zero_without_a_result_event_is_an_error(tmp_path, kind):
    h = Harness(tmp_path, kind)
    with pytest.raises(GatewayError) as info:
        await h.provider.chat(body("NORESULT"), ctx())
    assert info.value.status == 502 and "without a final result" in info.value.message


@run_async
async def test_missing_binary_is_503_naming_the_env_variable(tmp_path):
    provider = CodexCliProvider(SimpleNamespace(name="codex-cli", provider_type="codex_cli", models=[]),
                                {"PATH": str(tmp_path), "CODEX_CLI_BINARY": str(tmp_path / "no-such-codex")})
    assert provider.binary_path() is None
    with pytest.raises(GatewayError) as info:
        await provider.chat(body(), ctx())
    assert info.value.status == 503 and "CODEX_CLI_BINARY" in info.value.message


@run_async
async def test_binary_that_cannot_start_is_503_and_frees_its_slot(tmp_path):
    broken = tmp_path / "claude"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    provider = ClaudeCodeProvider(SimpleNamespace(name="cc", provider_type="claude_code", models=[]),
                                  {"PATH": os.environ["PATH"], "CLAUDE_CODE_BINARY": str(broken)})
    with pytest.raises(GatewayError) as info:
        await provider.chat(body(), ctx())
    assert info.value.status == 503 and "CLAUDE_CODE_BINARY" in info.value.message
    assert provider.running == 0 and provider._gate.active == 0


def test_binary_path_finds_the_tool_on_path_without_running_it(tmp_path):
    (tmp_path / "claude").write_text("#!/bin/sh\ntouch ran\n")
    (tmp_path / "claude").chmod(0o755)
    provider = ClaudeCodeProvider(SimpleNamespace(name="cc", provider_type="claude_code", models=[]),
                                  {"PATH": str(tmp_path)})
    assert provider.binary_path() == str(tmp_path / "claude")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("messages", [None, [], "hi", [{"role": "wizard", "content": "x"}], ["not an object"]])
@run_async
async def test_bad_messages_are_400(tmp_path, messages):
    h = Harness(tmp_path, "claude_code")
    request = {"model": "", "messages": messages} if messages is not None else {"model": ""}
    with pytest.raises(GatewayError) as info:
        await h.provider.chat(request, ctx())
    assert info.value.status == 400
    assert h.records() == []


# ---------------------------------------------------------------------------------------------
# settings, registry, prompt rendering
# ---------------------------------------------------------------------------------------------


def test_env_settings_and_defaults(caplog):
    config = SimpleNamespace(name="cursor", provider_type="cursor", models=[])
    provider = CursorProvider(config, {"CURSOR_MAX_CONCURRENT": "2", "CURSOR_TIMEOUT_SECS": "1.5",
                                       "CURSOR_AGENT_BINARY": "/opt/agent"})
    assert (provider.max_concurrent, provider.timeout_s, provider.binary) == (2, 1.5, "/opt/agent")
    assert provider.queue_limit == 2 and provider.running == 0
    defaults = CursorProvider(config, {})
    assert (defaults.max_concurrent, defaults.timeout_s, defaults.binary) == (4, 300.0, "cursor-agent")
    with caplog.at_level(logging.WARNING, logger="evo_gateway"):
        bad = CursorProvider(config, {"CURSOR_MAX_CONCURRENT": "lots", "CURSOR_TIMEOUT_SECS": "-3"})
    assert (bad.max_concurrent, bad.timeout_s) == (4, 300.0)
    assert "CURSOR_MAX_CONCURRENT" in caplog.text and "CURSOR_TIMEOUT_SECS" in caplog.text


def test_registry_names_the_three_types():
    import providers
    assert [providers.provider_class(t) for t in ("claude_code", "codex_cli", "cursor")] == [
        ClaudeCodeProvider, CodexCliProvider, CursorProvider]
    assert ClaudeCodeProvider(SimpleNamespace(name="cc", provider_type="claude_code", models=[])).environ is os.environ


def test_render_prompt_lone_user_message_is_its_text():
    assert render_prompt([{"role": "user", "content": "just this"}]) == "just this"
    assert render_prompt([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                        {"type": "image_url", "image_url": {"url": "x"}}]}]) \
        == "a\n[image omitted]"


def test_render_prompt_transcript_has_every_role():
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Use UTC."}]},
        {"role": "user", "content": [{"type": "text", "text": "Time?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\":\"UTC\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "assistant", "content": "Noon."},
        {"role": "user", "content": "Thanks"},
    ]
    assert render_prompt(messages) == (
        "System:\nBe terse.\n\n"
        "System:\nUse UTC.\n\n"
        "User:\nTime?\n[image omitted]\n\n"
        "Assistant:\n[called tool get_time (id call_1) with arguments: {\"tz\":\"UTC\"}]\n\n"
        "Tool result (call_1):\n12:00\n\n"
        "Assistant:\nNoon.\n\n"
        "User:\nThanks")


# ---------------------------------------------------------------------------------------------
# event parsers on recorded-shape lines
# ---------------------------------------------------------------------------------------------

PARSERS = {"claude": ClaudeEventParser, "codex": CodexEventParser, "cursor": CursorEventParser}
EXPECTED = json.loads((DATA_DIR / "expected.json").read_text())


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_event_parser_on_fixture(case):
    expected = EXPECTED[case]
    parser = PARSERS[expected["parser"]]()
    pieces = []
    for line in (DATA_DIR / f"{case}.jsonl").read_text().splitlines():
        pieces.extend(parser.feed(json.loads(line)))
    assert pieces == expected["pieces"]
    assert parser.usage == expected["usage"]
    assert parser.error == expected["error"]
    assert parser.finished == expected["finished"]
    if "cost_usd" in expected:
        assert parser.cost_usd == pytest.approx(expected["cost_usd"])
    if "model" in expected:
        assert parser.model == expected["model"]


def test_fake_tools_are_executable():
    for name in ("claude", "codex", "cursor-agent"):
        path = FAKE_DIR / name
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!/usr/bin/env python3\n")
