"""The incremental reader: tolerant, exact offsets, bounded memory, chunking-independent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tunerd import reader as reader_module
from tunerd.reader import DEFAULT_MAX_LINE_BYTES, Batch, LogReader

from .conftest import REAL_SAMPLE, run_line


def read_all(
    data: bytes,
    chunk: int | None = None,
    cap: int = 1 << 20,
    columnar: bool = False,
    now: float | None = None,
) -> tuple[Batch, LogReader]:
    reader = LogReader(max_line_bytes=cap, columnar=columnar, now=now)
    out = Batch()
    step = chunk or max(len(data), 1)
    # A columnar reader decodes every block whole that it can, however short (tests' logs are).
    previous, reader_module.WHOLE_MIN_BYTES = reader_module.WHOLE_MIN_BYTES, 1
    try:
        for i in range(0, len(data), step):
            batch = reader.feed(data[i : i + step])
            out.entries += batch.entries
            out.malformed += batch.malformed
    finally:
        reader_module.WHOLE_MIN_BYTES = previous
    batch = reader.finish()
    out.entries += batch.entries
    out.malformed += batch.malformed
    return out, reader


def test_real_sample_reads_clean() -> None:
    data = REAL_SAMPLE.read_bytes()
    batch, reader = read_all(data)
    assert len(batch.entries) == 63
    assert batch.malformed == []
    assert reader.offset == len(data)
    crons = [e.cron for e in batch.entries if e.cron]
    assert crons.count("TQQQ 15분 모니터링") == 51
    assert crons.count("GitHub 감시") == 3


def test_malformed_lines_are_reported_with_their_offsets() -> None:
    good = run_line().encode() + b"\n"
    lines = [
        good,
        b"{not json\n",
        b'{"type": "success", "context": {"cron": "\xff\xfe"}}\n',
        b"[1, 2, 3]\n",
        b'{"type": 7}\n',
        b'{"totalDuration": -5}\n',
        b'{"timestamp": "yesterday"}\n',
        b"\n",  # blank: not data, not malformed
        b"\x00\x00\x00" + good,  # copytruncate padding before a good line
        b"\xef\xbb\xbf" + good,  # a BOM
        good.replace(b"\n", b"\r\n"),  # CRLF
        good,
    ]
    data = b"".join(lines)
    batch, _ = read_all(data)
    assert len(batch.entries) == 5
    offsets = [sum(len(x) for x in lines[:i]) for i in range(len(lines))]
    assert [m.offset for m in batch.malformed] == offsets[1:7]
    reasons = [m.reason for m in batch.malformed]
    assert reasons[0].startswith("not JSON")
    assert reasons[1] == "invalid UTF-8"
    assert all(r.startswith("wrong shape") for r in reasons[2:])


def test_invalid_utf8_inside_a_skipped_payload_is_still_malformed() -> None:
    line = run_line().encode().replace(b'"xxxxxxxxxx"', b'"xx\xffxx"')
    batch, _ = read_all(line + b"\n" + run_line().encode() + b"\n")
    assert len(batch.entries) == 1
    assert [m.reason for m in batch.malformed] == ["invalid UTF-8"]


def test_huge_line_is_skipped_without_being_held() -> None:
    cap = 1 << 20
    huge = run_line(result={"output": "y" * (5 << 20)}).encode() + b"\n"
    good = run_line().encode() + b"\n"
    data = good + huge + good
    reader = LogReader(max_line_bytes=cap)
    entries, malformed, held = [], [], 0
    for i in range(0, len(data), 64 << 10):
        batch = reader.feed(data[i : i + (64 << 10)])
        entries += batch.entries
        malformed += batch.malformed
        held = max(held, len(reader._partial))
    assert len(entries) == 2
    assert [m.offset for m in malformed] == [len(good)]
    assert "cap" in malformed[0].reason
    assert held <= cap  # never more than the cap in memory
    assert reader.offset == len(data)


def test_a_10mb_result_is_a_valid_line_under_the_default_cap() -> None:
    line = run_line(result={"output": "z" * (10 << 20)}).encode() + b"\n"
    batch, _ = read_all(line, chunk=1 << 20, cap=DEFAULT_MAX_LINE_BYTES)
    assert len(batch.entries) == 1 and batch.malformed == []


def test_partial_line_waits_for_its_newline() -> None:
    line = run_line().encode()
    reader = LogReader()
    assert reader.feed(line[:50]).entries == []
    assert reader.offset == 0 and reader.pending_bytes == 50
    assert reader.feed(line[50:]).entries == []
    assert len(reader.feed(b"\n").entries) == 1
    assert reader.offset == len(line) + 1 and reader.pending_bytes == 0


def test_finish_decodes_an_unterminated_last_line_and_offsets_start_where_told() -> None:
    reader = LogReader(offset=1000)
    reader.feed(b"{bad\n" + run_line().encode())
    batch = reader.finish()
    assert len(batch.entries) == 1
    assert reader.offset == 1000 + 5 + len(run_line().encode())


CORPUS = [
    run_line().encode(),
    run_line(
        "TQQQ 15분 모니터링", (300, 1200), error={"statusCode": 429, "message": "HTTP 429"}
    ).encode(),
    run_line(None, ok=False).encode(),
    b"{broken",
    b"\xff\xfe\xfd",
    b"",
    b"\x00\x00",
    b'"just a string"',
    b"x" * 300,  # over the small cap used below
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(CORPUS), max_size=25),
    st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40),
    st.booleans(),
)
def test_chunked_reading_equals_whole_reading(
    lines: list[bytes], cuts: list[int], crlf: bool
) -> None:
    data = (b"\r\n" if crlf else b"\n").join(lines)
    whole, whole_reader = read_all(data, cap=256)
    reader = LogReader(max_line_bytes=256)
    chunked = Batch()
    position, i = 0, 0
    while position < len(data):
        size = cuts[i % len(cuts)]
        batch = reader.feed(data[position : position + size])
        chunked.entries += batch.entries
        chunked.malformed += batch.malformed
        position += size
        i += 1
    batch = reader.finish()
    chunked.entries += batch.entries
    chunked.malformed += batch.malformed
    assert chunked.entries == whole.entries
    assert chunked.malformed == whole.malformed
    assert reader.offset == whole_reader.offset == len(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_never_raises_on_arbitrary_bytes(data: bytes, step: int) -> None:
    batch, reader = read_all(data, chunk=step, cap=512)
    assert reader.offset == len(data)
    assert all(0 <= m.offset < len(data) for m in batch.malformed)


NOW = 1_771_000_000.0  # 2026-02-13


def test_absurd_values_are_malformed_lines_with_their_offsets() -> None:
    """A duration that overflows (1e39, 1e400), a negative one, and a timestamp far ahead of
    the reader's clock: each line is malformed at its own offset, the good ones around it read
    (fast path: one bad line among good ones; careful path: one after a broken line)."""
    good = run_line().encode() + b"\n"
    bad = [
        run_line(total=0).replace('"totalDuration": 0', '"totalDuration": 1e39'),
        run_line(total=0).replace('"totalDuration": 0', '"totalDuration": 1e400'),
        run_line(durations=(-5,)),
        run_line(ts="9999-12-31T23:59:59Z"),
        run_line(ts=253402300799999),
        "{broken",
        run_line(ts="2030-01-01T00:00:00Z"),  # careful path, after the broken line
    ]
    data = b""
    offsets = []
    for line in bad:
        data += good
        offsets.append(len(data))
        data += line.encode() + b"\n"
    for chunk in (len(data), 97):
        reader = LogReader(now=NOW)
        entries, malformed = [], []
        for i in range(0, len(data), chunk):
            batch = reader.feed(data[i : i + chunk])
            entries += batch.entries
            malformed += batch.malformed
        assert len(entries) == len(bad)
        assert [m.offset for m in malformed] == offsets
        assert "after the time it was read" in malformed[3].reason
    # A day ahead of the clock is a clock set a little wrong, not a malformed line.
    soon = run_line(ts=(NOW + 3600) * 1000).encode() + b"\n"
    assert LogReader(now=NOW).feed(soon).malformed == []
    # Without a clock (an old log read for what it holds), any time is accepted.
    assert len(LogReader().feed(data).malformed) == 4


# Shapes a block decoder could mistake for one object per line, or that must leave it.
AWKWARD = [
    *CORPUS,
    run_line().encode() + run_line().encode(),  # two objects on one line
    b'{"type": "success",',  # one object over two lines (with the next)
    b'"attempts": []}',
    b"\xef\xbb\xbf" + run_line().encode(),  # a byte-order mark
    b"   " + run_line().encode() + b"  ",
    run_line(ts="9999-12-31T00:00:00Z").encode(),  # far in the future
    run_line(ts=1770266655848).encode(),
    run_line(ts="2026-02-05T04:44:15").encode(),
    b"{}",
    b'{"type": 7}',
    b"[]",
    b"}",
    b"{",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(AWKWARD), max_size=30),
    st.integers(min_value=1, max_value=3000),
    st.booleans(),
    st.sampled_from([128, 256, 4096]),
)
def test_block_reading_equals_line_reading(
    lines: list[bytes], chunk: int, crlf: bool, cap: int
) -> None:
    """Whole blocks decoded at once (a whole-log read) give the entries, malformed lines and
    offsets that reading line by line does, whatever the blocks' edges."""
    data = (b"\r\n" if crlf else b"\n").join(lines) + b"\n"
    now = 1770266655.0
    by_line, line_reader = read_all(data, chunk=chunk, cap=cap, now=now)
    by_block, block_reader = read_all(data, chunk=chunk, cap=cap, columnar=True, now=now)
    assert by_block.entries == by_line.entries
    assert by_block.malformed == by_line.malformed
    assert block_reader.offset == line_reader.offset == len(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=700))
def test_block_reading_equals_line_reading_on_arbitrary_bytes(data: bytes, chunk: int) -> None:
    by_line, _ = read_all(data, chunk=chunk, cap=512)
    by_block, reader = read_all(data, chunk=chunk, cap=512, columnar=True)
    assert (by_block.entries, by_block.malformed) == (by_line.entries, by_line.malformed)
    assert reader.offset == len(data)


def test_a_clean_block_is_decoded_whole() -> None:
    """The fast path is really taken for a log of plain lines (and left for a malformed one)."""
    data = b"".join(run_line(f"c{i}").encode() + b"\n" for i in range(600))
    reader = LogReader(columnar=True)
    assert reader._decode_whole(data, Batch())
    assert not reader._decode_whole(data + b"{broken\n", Batch())
