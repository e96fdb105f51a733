"""The byte-level decoders of evo_http: line splitting and whole-frame cutting, at any split."""

from __future__ import annotations

import random
import re

from evo_http import LineSplitter, UpstreamResponse, ndjson_frame_end, sse_frame_end

SEPARATORS = (b"\n", b"\r\n", b"\r")


def random_stream(rng: random.Random, blank_lines: bool) -> bytes:
    out = b""
    for _ in range(rng.randint(0, 12)):
        out += bytes(rng.choice(b"ab:{} ") for _ in range(rng.randint(0, 9))) + rng.choice(SEPARATORS)
        if blank_lines and rng.random() < 0.4:
            out += rng.choice(SEPARATORS)
    return out + bytes(rng.choice(b"xy") for _ in range(rng.randint(0, 3)))


def random_pieces(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6)))) if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def test_line_splitter_gives_the_same_lines_however_the_bytes_are_cut():
    rng = random.Random(7)
    for _ in range(3000):
        data = random_stream(rng, blank_lines=True)
        *expected, rest = re.split(rb"\r\n|\r|\n", data)
        splitter = LineSplitter()
        got = [line for piece in random_pieces(rng, data) for line in splitter.feed(piece)]
        assert got + splitter.flush() == expected + ([rest] if rest else []), data


def test_line_splitter_keeps_a_crlf_split_across_feeds_as_one_line_end():
    splitter = LineSplitter()
    assert splitter.feed(b"a\r") == [b"a"]
    assert splitter.feed(b"\nb\r") == [b"b"]
    assert splitter.feed(b"c\n") == [b"c"]  # a CR then other bytes: the CR ended its line alone


def test_a_long_line_in_many_pieces_comes_out_whole_once():
    splitter = LineSplitter()
    pieces = [b"x" * 1000] * 500
    assert all(splitter.feed(piece) == [] for piece in pieces)
    assert splitter.feed(b"y\n") == [b"x" * 500_000 + b"y"]


def _reference_frames(pieces: list[bytes], frame_end) -> list[bytes]:
    """The obvious way (re-search everything held on every piece), to compare against."""
    out, held = [], b""
    for piece in pieces:
        data = held + piece
        end = frame_end(data)
        held = data[end:]
        if data[:end]:
            out.append(data[:end])
    return out + ([held] if held else [])


def _frames(pieces: list[bytes], frame_end) -> list[bytes]:
    out, held = [], []
    for piece in pieces:
        whole = UpstreamResponse._whole_frames(piece, held, frame_end)
        if whole:
            out.append(whole)
    return out + ([b"".join(held)] if held else [])


def test_whole_frames_cut_where_searching_everything_would_however_the_bytes_arrive():
    rng = random.Random(11)
    for frame_end in (sse_frame_end, ndjson_frame_end):
        for _ in range(3000):
            data = random_stream(rng, blank_lines=True)
            pieces = random_pieces(rng, data)
            assert _frames(pieces, frame_end) == _reference_frames(pieces, frame_end), (pieces, frame_end)
        for size in (1, 2):  # pieces shorter than a blank line
            data = b"data: a\r\n\r\ndata: b\r\r: c\n\n" * 2
            pieces = [data[i:i + size] for i in range(0, len(data), size)]
            assert _frames(pieces, frame_end) == _reference_frames(pieces, frame_end)
