"""evo-gateway command line: `serve`, `check`, and `auth generate|list|revoke` for the gateway's keys.

Runs the same way from a checkout (`python3 evo_gateway_cli.py ...`), from the zipapp
(`python3 evo_gateway.pyz ...`) and as the installed `evo-gateway` console command.
Exit codes: 0 done, 1 refused (duplicate name, unknown name, unusable keys file; for `check`: an
enabled provider that cannot be used), 2 usage (for `check` and `serve`: an invalid config).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import evo_gateway

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

KEYS_HELP = (f"keys file (default: ${evo_gateway.KEYS_ENV}, else {evo_gateway.DEFAULT_KEYS_PATH}; "
             "the running gateway reads the same file)")

AUTH_EPILOG = (f"The gateway checks keys only when {evo_gateway.AUTH_ENV} is true, 1 or yes. It stores only "
               "the SHA-256 digest of each key, its name, a display prefix and the creation time; it notices "
               "a changed keys file within a second, so a revoked key stops working without a restart.")


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------


def _key_name(text: str) -> str:
    """argparse type for a new key's name: non-empty, printable, no whitespace."""
    if not text:
        raise argparse.ArgumentTypeError("a key name cannot be empty")
    bad = [c for c in text if c.isspace() or not c.isprintable()]
    if bad:
        raise argparse.ArgumentTypeError(
            f"invalid key name {text!r}: no spaces, tabs or control characters (found {bad[0]!r})")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (its help texts follow SPEC.md)."""
    parser = argparse.ArgumentParser(
        description="evo-gateway: one address for every LLM client on this machine (OpenAI, Anthropic, "
                    "Ollama and Codex dialects), routed to the provider named in the model.")
    parser.add_argument("--version", action="version", version=f"evo-gateway {evo_gateway.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser(
        "serve", help="run the gateway",
        description="Run the gateway. Reads the config file, writing one with the defaults if it is missing; "
                    "re-reads it when it changes on disk or on SIGHUP. SIGTERM/SIGINT stop accepting "
                    "connections and let open requests finish (up to server.shutdown_grace_s; the rest end "
                    "with an error event); a second signal exits at once.")
    serve.add_argument("--config", metavar="PATH",
                       help="config file (default: $GATEWAY_CONFIG, else ./gateway.json)")
    serve.add_argument("--host", metavar="HOST", help="address to listen on (overrides server.host)")
    serve.add_argument("--port", metavar="PORT", type=_port, help="port to listen on (overrides server.port)")
    serve.add_argument("--workers", metavar="N", type=_positive_int,
                       help="worker processes sharing the port with SO_REUSEPORT, supervised by this process: "
                            "a worker that dies is restarted; SIGTERM/SIGHUP reach them all (overrides "
                            "server.workers)")

    check = commands.add_parser(
        "check", help="validate the config and probe every enabled provider",
        description="Validate the config file, show for each provider whether its key variables are set, "
                    "empty or missing (never their values), probe each enabled provider once (the same "
                    "probe as /health: GET on its model list, /api/version for Ollama; CLI tools are "
                    "looked up on PATH, never run) and give a verdict. Exits 1 if an enabled provider "
                    "is unusable, 2 if the config is invalid.")
    check.add_argument("--config", metavar="PATH",
                       help="config file (default: $GATEWAY_CONFIG, else ./gateway.json)")
    check.add_argument("--timeout", metavar="SECONDS", type=float, default=evo_gateway.PROBE_TIMEOUT_S,
                       help=f"give up on a probe after this long (default {evo_gateway.PROBE_TIMEOUT_S:g})")

    auth = commands.add_parser(
        "auth", help="manage the keys clients use to call the gateway",
        description="Manage the keys clients present to the gateway (Authorization: Bearer <key> or "
                    "x-api-key: <key>).", epilog=AUTH_EPILOG)
    auth.add_argument("--keys", metavar="PATH", help=KEYS_HELP)
    actions = auth.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    generate = actions.add_parser(
        "generate", help="create a key and print it once",
        description="Create a key (evo- and 48 hex characters), store its SHA-256 digest under NAME and print "
                    "the key. It is shown only this once. A name already in use is refused.", epilog=AUTH_EPILOG)
    generate.add_argument("--name", required=True, type=_key_name,
                          help="a unique name for the key's holder (printable, no spaces)")
    generate.add_argument("--keys", metavar="PATH", dest="sub_keys", help=KEYS_HELP)

    listing = actions.add_parser(
        "list", help="show the keys' names, prefixes and creation times",
        description="Show each key's name, display prefix and creation time (never the key or its digest).")
    listing.add_argument("--json", action="store_true",
                         help="print a JSON list of {name, prefix, created_at} for scripts")
    listing.add_argument("--keys", metavar="PATH", dest="sub_keys", help=KEYS_HELP)

    revoke = actions.add_parser(
        "revoke", help="remove a key",
        description="Remove the key stored under NAME. A running gateway refuses it within a second.")
    revoke.add_argument("--name", required=True, help="the name the key was generated with")
    revoke.add_argument("--keys", metavar="PATH", dest="sub_keys", help=KEYS_HELP)
    return parser


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    return evo_gateway.serve_main(args.config, args.host, args.port, args.workers)


def cmd_check(config_file: str | None, timeout_s: float) -> int:
    path = evo_gateway.config_path(config_file)
    try:
        config = evo_gateway.load_config(path, create=False)
    except evo_gateway.ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    for warning in config.warnings:
        print(f"warning: {warning}")
    enabled = [p for p in config.providers if p.enabled]
    print(f"config {path}: valid ({len(config.providers)} providers, {len(enabled)} enabled)")
    loop = evo_gateway.new_event_loop()
    try:
        rows = loop.run_until_complete(evo_gateway.check_providers(config, timeout_s=timeout_s))
    finally:
        loop.close()
    table = [("PROVIDER", "TYPE", "KEY VARIABLES", "VERDICT", "DETAIL")]
    for row in rows:
        keys = ", ".join(f"{name}: {state}" for name, state in row["keys"]) or "-"
        table.append((row["name"], row["type"], keys, row["verdict"], row["detail"]))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    print()
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4])
    unusable = [r["name"] for r in rows if r["usable"] is False]
    print()
    if not enabled:
        print(f"FAIL: no provider is enabled in {path}; set \"enabled\": true for one")
        return EXIT_REFUSED
    if unusable:
        print(f"FAIL: {len(unusable)} of {len(enabled)} enabled providers unusable: {', '.join(unusable)}")
        return EXIT_REFUSED
    print(f"OK: all {len(enabled)} enabled providers usable")
    return EXIT_OK


def cmd_generate(path: str, name: str) -> int:
    with evo_gateway.locked_keys_file(path):
        doc = evo_gateway.read_keys_file(path)
        if any(entry["name"] == name for entry in doc["keys"]):
            _error(f"a key named {name!r} already exists in {path}; revoke it first or pick another name")
            return EXIT_REFUSED
        key = evo_gateway.new_key()
        doc["keys"].append({"name": name, "key_hash": evo_gateway.hash_key(key),
                            "prefix": key[:evo_gateway.KEY_DISPLAY_CHARS],
                            "created_at": evo_gateway.utc_timestamp()})
        evo_gateway.write_keys_file(path, doc)
    print(f"Generated API key for {name!r} (stored in {path}):\n\n  {key}\n\n"
          "Save this key now: it cannot be shown again.")
    return EXIT_OK


def cmd_list(path: str, as_json: bool) -> int:
    keys = evo_gateway.read_keys_file(path)["keys"]
    if as_json:
        print(json.dumps([{"name": e["name"], "prefix": e["prefix"], "created_at": e["created_at"]}
                          for e in keys], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not keys:
        print(f"No keys in {path}." if _exists(path) else f"No keys: {path} does not exist yet.")
        return EXIT_OK
    name_width = max(20, *(len(e["name"]) for e in keys))
    prefix_width = max(20, *(len(e["prefix"]) + 3 for e in keys))
    print(f"{'NAME':<{name_width}} {'PREFIX':<{prefix_width}} CREATED")
    print("-" * (name_width + prefix_width + 25))
    for e in keys:
        print(f"{e['name']:<{name_width}} {e['prefix'] + '...':<{prefix_width}} {_show_time(e['created_at'])}")
    return EXIT_OK


def cmd_revoke(path: str, name: str) -> int:
    with evo_gateway.locked_keys_file(path):
        doc = evo_gateway.read_keys_file(path)
        kept = [e for e in doc["keys"] if e["name"] != name]
        if len(kept) == len(doc["keys"]):
            where = path if _exists(path) else f"{path} (the file does not exist)"
            _error(f"no key named {name!r} in {where}")
            return EXIT_REFUSED
        doc["keys"] = kept
        evo_gateway.write_keys_file(path, doc)
    print(f"Revoked key {name!r} (removed from {path}).")
    return EXIT_OK


_ISO_UTC = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(\.\d+)?(Z|\+00:00)")


def _show_time(created_at: str) -> str:
    """`2026-02-24T20:26:51.123456789Z` → `2026-02-24 20:26:51 UTC`; anything else as it is."""
    m = _ISO_UTC.fullmatch(created_at)
    return f"{m.group(1)} {m.group(2)} UTC" if m else created_at


def _exists(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default: `sys.argv[1:]`); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: keep main() a plain function
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "check":
        return cmd_check(args.config, args.timeout)
    path = evo_gateway.keys_path(args.sub_keys or args.keys)
    try:
        if args.action == "generate":
            return cmd_generate(path, args.name)
        if args.action == "list":
            return cmd_list(path, args.json)
        return cmd_revoke(path, args.name)
    except evo_gateway.KeyFileError as exc:
        _error(f"{exc}; the file was left as it is")
        return EXIT_REFUSED
    except OSError as exc:
        _error(f"{path}: {exc.strerror or exc}")
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
