"""Shared body of the fake `claude`, `codex` and `cursor-agent` used by tests/test_cli_provider.py.

Each fake parses its argv the way the real tool does (the prompt on stdin, or after `--`),
appends a record of argv, stdin, environment, cwd and pid to $FAKE_CLI_RECORD, and prints the
real tool's JSON event lines. The prompt text picks the behaviour:

    SLEEP     print some text, start a sleeping grandchild, then sleep forever
    STUBBORN  (with SLEEP) the tool and its grandchild ignore SIGTERM: only SIGKILL ends them
    WAITFILE  wait until the file $FAKE_CLI_RELEASE exists, then answer normally
    FAIL      print some text, write to stderr, exit 1
    ISERROR   print some text, then the tool's own error event
    NORESULT  print some text and exit 0 without the final result event
    OLDFORMAT (codex) answer in the older {"id", "msg"} event format
    otherwise a realistic answer in several pieces, with usage
"""

import json
import os
import signal
import subprocess
import sys
import time

STDERR_SECRET = "SECRET_STDERR_DETAIL"


def emit(event):
    sys.stdout.write((event if isinstance(event, str) else json.dumps(event)) + "\n")
    sys.stdout.flush()
    time.sleep(0.01)


def record(tool, argv, prompt_stdin, extra=None):
    path = os.environ.get("FAKE_CLI_RECORD")
    if not path:
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_CLI_")}
    entry = {"tool": tool, "argv": argv, "stdin": prompt_stdin, "env": env, "cwd": os.getcwd(),
             "pid": os.getpid(), "pgid": os.getpgid(0)}
    entry.update(extra or {})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)


def parse_argv(tool, argv):
    """Return (prompt, from_stdin) the way the real tool reads it; exit 2 on a bad command line."""
    if tool == "claude":
        if "-p" not in argv or "--verbose" not in argv or argv[argv.index("--output-format") + 1] != "stream-json":
            sys.stderr.write("Error: When using --print, --output-format=stream-json requires --verbose\n")
            sys.exit(1)
        positional = [a for i, a in enumerate(argv) if not a.startswith("-") and argv[i - 1] not in
                      ("--output-format", "--model")]
        if positional:
            sys.stderr.write("fake claude: unexpected positional prompt\n")
            sys.exit(2)
        return sys.stdin.read(), True
    if tool == "codex":
        if argv[:2] != ["exec", "--json"] or argv[-1] != "-" or "--skip-git-repo-check" not in argv:
            sys.stderr.write("fake codex: bad command line\n")
            sys.exit(2)
        return sys.stdin.read(), True
    if "--" not in argv:
        sys.stderr.write("fake cursor-agent: the prompt must follow --\n")
        sys.exit(2)
    rest = argv[argv.index("--") + 1:]
    if len(rest) != 1:
        sys.stderr.write("fake cursor-agent: expected exactly one prompt argument\n")
        sys.exit(2)
    stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    return rest[0], stdin


def main(tool):
    argv = sys.argv[1:]
    prompt, stdin = parse_argv(tool, argv)
    extra = {}
    if "STUBBORN" in prompt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)      # inherited by the grandchild across exec
    if "SLEEP" in prompt:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        extra["grandchild"] = grandchild.pid
    record(tool, argv, prompt if stdin is True else stdin, extra)
    if "WAITFILE" in prompt:
        release = os.environ["FAKE_CLI_RELEASE"]
        while not os.path.exists(release):
            time.sleep(0.02)
    emit("fake " + tool + " debug: this line is not JSON")
    sys.stderr.write("fake " + tool + ": some log noise on stderr\n")
    sys.stderr.flush()
    TOOLS[tool](prompt)


# --- claude ------------------------------------------------------------------------------------

def claude_assistant(msg_id, blocks):
    return {"type": "assistant", "message": {"id": msg_id, "type": "message", "role": "assistant",
                                             "model": "claude-fake", "content": blocks, "stop_reason": None,
                                             "usage": {"input_tokens": 5, "output_tokens": 1}},
            "parent_tool_use_id": None, "session_id": "sess-1", "uuid": "u-" + msg_id}


def stops_early(prompt, report_error):
    """The behaviours a test picks by a word in the prompt, after the tool's first text.

    SLEEP hangs, FAIL exits 1 with a secret on stderr, ISERROR reports the tool's own error
    (`report_error`), NORESULT ends without a final event. True: the run ends here.
    """
    if "SLEEP" in prompt:
        time.sleep(600)
    if "FAIL" in prompt:
        sys.stderr.write("fatal: " + STDERR_SECRET + "\n")
        sys.exit(1)
    if "ISERROR" in prompt:
        report_error()
        return True
    return "NORESULT" in prompt


def codex_turn_failed():
    emit({"type": "error", "message": "stream disconnected before completion"})
    emit({"type": "turn.failed", "error": {"message": "stream disconnected before completion"}})
    sys.exit(1)


def claude(prompt):
    emit({"type": "system", "subtype": "init", "session_id": "sess-1", "cwd": os.getcwd(), "model": "claude-fake",
          "tools": ["Bash", "Read"], "mcp_servers": [], "permissionMode": "default", "apiKeySource": "none"})
    emit(claude_assistant("msg_1", [{"type": "text", "text": "Let me check."}]))
    if stops_early(prompt, lambda: emit({
            "type": "result", "subtype": "error_during_execution", "is_error": True,
            "result": "API Error: 529 overloaded", "session_id": "sess-1",
            "usage": {"input_tokens": 3, "output_tokens": 1}})):
        return
    emit(claude_assistant("msg_1", [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "a"}}]))
    emit({"type": "user", "message": {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42", "is_error": False}]},
        "parent_tool_use_id": None, "session_id": "sess-1"})
    emit(claude_assistant("msg_sub", [{"type": "text", "text": "SUBAGENT TEXT"}]) | {"parent_tool_use_id": "toolu_1"})
    emit(claude_assistant("msg_2", [{"type": "text", "text": "The answer"}]))
    emit(claude_assistant("msg_2", [{"type": "text", "text": "The answer is 42."}]))
    emit({"type": "result", "subtype": "success", "is_error": False, "duration_ms": 2100, "num_turns": 2,
          "result": "The answer is 42.", "session_id": "sess-1", "total_cost_usd": 0.0123,
          "usage": {"input_tokens": 10, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3,
                    "output_tokens": 7}, "permission_denials": []})


# --- codex -------------------------------------------------------------------------------------

def codex(prompt):
    if "OLDFORMAT" in prompt:
        return codex_old()
    emit({"type": "thread.started", "thread_id": "thread-1"})
    emit({"type": "turn.started"})
    emit({"type": "item.completed", "item": {"id": "item_0", "type": "reasoning", "text": "**Thinking** hidden"}})
    emit({"type": "item.completed", "item": {"id": "item_1", "type": "agent_message", "text": "Let me check."}})
    if stops_early(prompt, codex_turn_failed):
        return
    emit({"type": "item.started", "item": {"id": "item_2", "type": "command_execution", "command": "cat a",
                                           "aggregated_output": "", "exit_code": None, "status": "in_progress"}})
    emit({"type": "item.completed", "item": {"id": "item_2", "type": "command_execution", "command": "cat a",
                                             "aggregated_output": "42\n", "exit_code": 0, "status": "completed"}})
    emit({"type": "item.updated", "item": {"id": "item_3", "type": "agent_message", "text": "The answer"}})
    emit({"type": "item.completed", "item": {"id": "item_3", "type": "agent_message", "text": "The answer is 42."}})
    emit({"type": "turn.completed", "usage": {"input_tokens": 100, "cached_input_tokens": 40, "output_tokens": 9}})


def codex_old():
    emit({"id": "0", "msg": {"type": "session_configured", "session_id": "s-1", "model": "o4-mini"}})
    emit({"id": "1", "msg": {"type": "task_started"}})
    emit({"id": "1", "msg": {"type": "agent_reasoning", "text": "hidden"}})
    for piece in ("The ", "answer ", "is 42."):
        emit({"id": "1", "msg": {"type": "agent_message_delta", "delta": piece}})
    emit({"id": "1", "msg": {"type": "agent_message", "message": "The answer is 42."}})
    emit({"id": "1", "msg": {"type": "token_count", "info": {"total_token_usage": {
        "input_tokens": 50, "cached_input_tokens": 10, "output_tokens": 5, "total_tokens": 55}}}})
    emit({"id": "1", "msg": {"type": "task_complete", "last_agent_message": "The answer is 42."}})


# --- cursor-agent ------------------------------------------------------------------------------

def cursor_text(text, ts=True, call_id=None):
    event = {"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
             "session_id": "sess-c"}
    if ts:
        event["timestamp_ms"] = int(time.time() * 1000)
    if call_id:
        event["model_call_id"] = call_id
    return event


def cursor(prompt):
    emit({"type": "system", "subtype": "init", "apiKeySource": "env", "cwd": os.getcwd(), "session_id": "sess-c",
          "model": "Cursor Fake", "permissionMode": "default"})
    emit({"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": prompt}]},
          "session_id": "sess-c"})
    emit(cursor_text("Let me "))
    emit(cursor_text("check."))
    emit(cursor_text("Let me check.", ts=False))
    if stops_early(prompt, lambda: emit({"type": "result", "subtype": "error", "is_error": True,
                                         "result": "usage limit reached", "session_id": "sess-c"})):
        return
    emit({"type": "tool_call", "subtype": "started", "call_id": "c1",
          "tool_call": {"readToolCall": {"args": {"path": "a"}}}, "session_id": "sess-c"})
    emit({"type": "tool_call", "subtype": "completed", "call_id": "c1",
          "tool_call": {"readToolCall": {"args": {"path": "a"}, "result": {"success": {"content": "42"}}}},
          "session_id": "sess-c"})
    emit(cursor_text(" The answer"))
    emit(cursor_text(" is 42."))
    emit(cursor_text(" The answer is 42.", call_id="mc-1"))
    emit({"type": "result", "subtype": "success", "is_error": False, "duration_ms": 1234, "duration_api_ms": 1200,
          "result": "Let me check. The answer is 42.", "session_id": "sess-c", "request_id": "r1",
          "usage": {"inputTokens": 20, "outputTokens": 6, "cacheReadTokens": 4, "cacheWriteTokens": 0}})


TOOLS = {"claude": claude, "codex": codex, "cursor-agent": cursor}
