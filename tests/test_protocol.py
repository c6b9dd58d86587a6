"""Tests of replicore.protocol: the binary framing of the replication data path."""

from __future__ import annotations

import contextlib
import os
import struct

import blake3
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicore.protocol import (
    CODEC_RAW,
    CODEC_ZSTD,
    DEFAULT_BLOCK_SIZE,
    FRAME_HEADER_SIZE,
    KEY_ENTRY_SIZE,
    MAX_BLOCK_SIZE,
    MAX_KEYS_BATCH_BYTES,
    MAX_KEYS_PER_BATCH,
    MAX_RAWDATA_BATCH_BYTES,
    MAX_RECORDS_PER_BATCH,
    MAX_STORED_LENGTH,
    MIN_BLOCK_SIZE,
    KeyEntry,
    KeyListChecksum,
    KeyListDecoder,
    ProtocolError,
    RecordFrame,
    RecordStreamDecoder,
    check_block_size,
    compress_block,
    decode_keys,
    decode_missing,
    decompress_record,
    encode_keys,
    encode_missing,
    encode_record,
    encode_records_header,
    iter_records,
    record_key,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers


def make_block(i: int, size: int = 4096, compressible: bool = True) -> bytes:
    if compressible:
        return (f"block {i} ".encode() * size)[:size]
    return os.urandom(size)


def records_body(blocks: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(encode_records_header(len(blocks)))
    for index, raw in blocks:
        codec, payload = compress_block(raw)
        out += encode_record(index, record_key(raw), len(raw), codec, payload)
    return bytes(out)


def raw_frame(index: int, raw_length: int, stored: int, codec: int, payload: bytes = b"") -> bytes:
    return struct.pack(">Q32sIIB", index, b"k" * 32, raw_length, stored, codec) + payload


def feed_chunked(dec: KeyListDecoder | RecordStreamDecoder, body: bytes, cuts: list[int]) -> list:
    """Feed body split at cuts, draining events after each feed; then finish()."""
    events: list = []
    bounds = sorted({c for c in cuts if 0 < c < len(body)})
    prev = 0
    for c in [*bounds, len(body)]:
        dec.feed(body[prev:c])
        prev = c
        for _ in range(len(body) + 2):  # bounded: a decoder must never loop forever
            ev = dec.next_event()
            if ev is None:
                break
            events.append(ev)
        else:
            pytest.fail("decoder kept returning events")
    dec.finish()
    return events


def plain(frames: list[RecordFrame]) -> list[tuple]:
    return [(f.index, f.key, f.raw_length, f.codec, bytes(f.payload)) for f in frames]


# --------------------------------------------------------------------------- keys, sizes


def test_record_key_is_blake3_256_of_uncompressed_bytes() -> None:
    data = b"hello world" * 100
    assert record_key(data) == blake3.blake3(data).digest()
    assert len(record_key(data)) == 32
    assert record_key(memoryview(data)) == record_key(data)
    assert record_key(data) != record_key(data + b"x")


def test_record_key_detects_payload_that_does_not_match_its_key() -> None:
    raw = make_block(1)
    other = make_block(2)
    body = records_body([(1, raw)])
    # Swap the payload for another block's while keeping the first block's key.
    codec, payload = compress_block(other)
    forged = encode_records_header(1)
    forged += encode_record(1, record_key(raw), len(other), codec, payload)
    [frame] = list(iter_records(forged))  # the decoder does not check keys...
    data = decompress_record(frame.codec, frame.payload, frame.raw_length)
    assert record_key(data) != frame.key  # ...the server does, with record_key
    [good] = list(iter_records(body))
    assert record_key(decompress_record(good.codec, good.payload, good.raw_length)) == good.key


@pytest.mark.parametrize("n", [MIN_BLOCK_SIZE, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, 8192])
def test_check_block_size_accepts_powers_of_two_in_range(n: int) -> None:
    check_block_size(n)


@pytest.mark.parametrize("n", [0, 2048, MAX_BLOCK_SIZE * 2, 65535, 3 * 4096, -4096, True])
def test_check_block_size_rejects_others(n: int) -> None:
    with pytest.raises(ProtocolError):
        check_block_size(n)


def test_limits_have_the_documented_values() -> None:
    assert MAX_BLOCK_SIZE == 1 << 20
    assert MAX_STORED_LENGTH == MAX_BLOCK_SIZE + 65536
    assert MAX_KEYS_BATCH_BYTES == 8 + 44 * MAX_KEYS_PER_BATCH
    assert MAX_RAWDATA_BATCH_BYTES == 32 << 20
    assert (KEY_ENTRY_SIZE, FRAME_HEADER_SIZE) == (44, 49)
    assert MAX_RECORDS_PER_BATCH == 4096


def test_checksum_is_blake3_of_index_and_key_in_ascending_order() -> None:
    entries = [KeyEntry(i, record_key(bytes([i])), 4096) for i in range(5)]
    ck = KeyListChecksum()
    for e in entries:
        ck.update(e.index, e.key)
    expected = blake3.blake3(b"".join(struct.pack(">Q", e.index) + e.key for e in entries))
    assert ck.hexdigest() == expected.hexdigest()
    assert len(ck.hexdigest()) == 64 and ck.count == 5


def test_checksum_rejects_out_of_order_or_duplicate_index() -> None:
    ck = KeyListChecksum()
    ck.update(3, b"a" * 32)
    with pytest.raises(ValueError):
        ck.update(3, b"b" * 32)
    with pytest.raises(ValueError):
        ck.update(2, b"b" * 32)


def test_checksum_of_ascending_runs_equals_entry_by_entry() -> None:
    entries = [(i * 3, record_key(bytes([i]))) for i in range(10)]
    one_by_one, in_runs = KeyListChecksum(), KeyListChecksum()
    for index, key in entries:
        one_by_one.update(index, key)
    in_runs.update_ascending(entries[:4])
    in_runs.update_ascending([])
    in_runs.update_ascending(entries[4:])
    assert in_runs.hexdigest() == one_by_one.hexdigest() and in_runs.count == 10
    with pytest.raises(ValueError):  # a run must follow what came before
        in_runs.update_ascending(entries[-1:])


def test_checksum_of_empty_session_is_blake3_of_nothing() -> None:
    assert KeyListChecksum().hexdigest() == blake3.blake3(b"").hexdigest()


# --------------------------------------------------------------------------- key list


def test_key_list_round_trip() -> None:
    entries = [KeyEntry(i * 7, record_key(str(i).encode()), 4096 + i) for i in range(100)]
    body = encode_keys(entries)
    assert body[:8] == b"RKY1" + struct.pack(">I", 100)
    assert len(body) == 8 + 44 * 100
    assert decode_keys(body) == entries


def test_key_list_layout_is_index_key_length_big_endian() -> None:
    body = encode_keys([KeyEntry(0x0102030405060708, b"\xaa" * 32, 0x1000)])
    assert body[8:16] == bytes(range(1, 9))
    assert body[16:48] == b"\xaa" * 32
    assert body[48:52] == b"\x00\x00\x10\x00"


def test_empty_key_batch_is_valid() -> None:
    assert decode_keys(encode_keys([])) == []


def test_key_decoder_rejects_count_above_max_at_header() -> None:
    dec = KeyListDecoder(max_count=10)
    dec.feed(b"RKY1" + struct.pack(">I", 11))
    with pytest.raises(ProtocolError) as ei:
        dec.next_event()
    assert ei.value.offset == 4


def test_key_decoder_rejects_zero_or_oversized_length() -> None:
    good = KeyEntry(1, b"k" * 32, 10)
    for bad_len in (0, MAX_BLOCK_SIZE + 1):
        body = b"RKY1" + struct.pack(">I", 2) + encode_keys([good])[8:]
        body += struct.pack(">Q32sI", 9, b"k" * 32, bad_len)
        dec = KeyListDecoder()
        dec.feed(body)
        assert dec.next_event() == good  # entries before the bad one are delivered
        with pytest.raises(ProtocolError) as ei:
            dec.next_event()
        assert ei.value.index == 9 and ei.value.offset == 8 + 44 + 40


def test_key_decoder_rejects_count_larger_than_entries_present() -> None:
    body = b"RKY1" + struct.pack(">I", 3) + encode_keys([KeyEntry(0, b"k" * 32, 1)])[8:]
    with pytest.raises(ProtocolError, match="1 of 3"):
        decode_keys(body)


def test_key_decoder_rejects_trailing_garbage() -> None:
    body = encode_keys([KeyEntry(0, b"k" * 32, 1)]) + b"x"
    with pytest.raises(ProtocolError, match="trailing") as ei:
        decode_keys(body)
    assert ei.value.offset == 52


def test_key_decoder_rejects_truncated_entry() -> None:
    body = encode_keys([KeyEntry(0, b"k" * 32, 1), KeyEntry(1, b"k" * 32, 1)])[:-5]
    with pytest.raises(ProtocolError) as ei:
        decode_keys(body)
    assert ei.value.offset == 52


def test_key_decoder_rejects_body_larger_than_batch_limit_in_feed() -> None:
    dec = KeyListDecoder(max_count=1)
    with pytest.raises(ProtocolError):
        dec.feed(b"RKY1" + struct.pack(">I", 1) + b"\0" * 45)


# --------------------------------------------------------------------------- missing answer


def test_missing_answer_round_trip() -> None:
    body = encode_missing([5, 0, 2**64 - 1])
    assert body == b"RMS1" + struct.pack(">IQQQ", 3, 5, 0, 2**64 - 1)
    assert decode_missing(body) == [5, 0, 2**64 - 1]
    assert decode_missing(encode_missing([])) == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"RMS1",
        b"RKY1" + struct.pack(">I", 0),
        b"RMS1" + struct.pack(">IQ", 2, 1),
        b"RMS1" + struct.pack(">IQ", 0, 1),
        b"RMS1" + struct.pack(">I", MAX_KEYS_PER_BATCH + 1),
    ],
)
def test_decode_missing_is_strict(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_missing(body)


# --------------------------------------------------------------------------- records


def test_record_stream_round_trip_with_both_codecs() -> None:
    blocks = [(0, make_block(0)), (1, make_block(1, 4096, compressible=False)), (7, b"x")]
    body = records_body(blocks)
    frames = list(iter_records(body))
    assert [f.codec for f in frames] == [CODEC_ZSTD, CODEC_RAW, CODEC_RAW]
    for (index, raw), f in zip(blocks, frames, strict=True):
        assert f.index == index and f.raw_length == len(raw) and f.key == record_key(raw)
        assert decompress_record(f.codec, f.payload, f.raw_length) == raw


def test_record_frame_header_layout() -> None:
    frame = encode_record(0x0102030405060708, b"\xbb" * 32, 3, CODEC_RAW, b"abc")
    assert frame == (
        bytes(range(1, 9)) + b"\xbb" * 32 + b"\0\0\0\x03" + b"\0\0\0\x03" + b"\x00" + b"abc"
    )
    assert encode_records_header(2) == b"RRD1\0\0\0\x02"


def test_compress_block_falls_back_to_raw_when_zstd_does_not_help() -> None:
    raw = os.urandom(4096)
    assert compress_block(raw) == (CODEC_RAW, raw)
    codec, payload = compress_block(b"\0" * 65536)
    assert codec == CODEC_ZSTD and len(payload) < 100


def test_decompress_rejects_frame_of_different_length() -> None:
    frame = zstandard.ZstdCompressor().compress(b"a" * 5000)
    with pytest.raises(ProtocolError):
        decompress_record(CODEC_ZSTD, frame, 4999)
    with pytest.raises(ProtocolError):
        decompress_record(CODEC_ZSTD, frame, 5001)
    assert decompress_record(CODEC_ZSTD, frame, 5000) == b"a" * 5000


def test_decompress_bounds_output_of_frame_without_content_size() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 100000)
    with pytest.raises(ProtocolError):
        decompress_record(CODEC_ZSTD, frame, 4096)
    with pytest.raises(ProtocolError):
        decompress_record(CODEC_ZSTD, frame, 100001)
    assert decompress_record(CODEC_ZSTD, frame, 100000) == b"a" * 100000


def with_content_size(frame: bytes, size: int) -> bytes:
    """Rewrite a zstd frame header to declare ``size`` bytes (8-byte field, single segment)."""
    desc = frame[4]
    fcs_flag, single, dict_flag = desc >> 6, (desc >> 5) & 1, desc & 3
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    header_len = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + fcs_len
    new_desc = 0xE0 | (desc & 0x07)
    dict_id = frame[header_len - fcs_len - (0, 1, 2, 4)[dict_flag] : header_len - fcs_len]
    return frame[:4] + bytes([new_desc]) + dict_id + struct.pack("<Q", size) + frame[header_len:]


def test_decompress_rejects_lying_content_size_without_allocating_it() -> None:
    frame = zstandard.ZstdCompressor().compress(b"a" * 5000)
    assert zstandard.frame_content_size(with_content_size(frame, 5000)) == 5000
    assert decompress_record(CODEC_ZSTD, with_content_size(frame, 5000), 5000) == b"a" * 5000
    # Claims 2**40 bytes: refused before decompressing (no 1 TiB allocation).
    with pytest.raises(ProtocolError):
        decompress_record(CODEC_ZSTD, with_content_size(frame, 2**40), 5000)
    # Claims the raw length but really holds one byte less: zstd itself notices.
    with pytest.raises(ProtocolError):
        decompress_record(CODEC_ZSTD, with_content_size(frame, 5001), 5001)


@pytest.mark.parametrize(
    "payload",
    [b"", b"not zstd at all", zstandard.ZstdCompressor().compress(b"a" * 4096)[:-3]],
)
def test_decompress_rejects_bad_zstd_frames(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decompress_record(CODEC_ZSTD, payload, 4096)


def test_decompress_rejects_trailing_data_after_zstd_frame() -> None:
    frame = zstandard.ZstdCompressor().compress(b"a" * 4096)
    with pytest.raises(ProtocolError):
        decompress_record(CODEC_ZSTD, frame + frame, 4096)


def test_decompress_rejects_codec_0_payload_of_wrong_length_and_unknown_codec() -> None:
    with pytest.raises(ProtocolError):
        decompress_record(CODEC_RAW, b"abc", 4)
    with pytest.raises(ProtocolError):
        decompress_record(2, b"abc", 3)


def test_decoder_rejects_zero_length_body() -> None:
    for dec in (KeyListDecoder(), RecordStreamDecoder()):
        assert dec.next_event() is None
        with pytest.raises(ProtocolError, match="empty") as ei:
            dec.finish()
        assert ei.value.offset == 0


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_decoder_rejects_truncated_header(cut: int) -> None:
    for body in (encode_records_header(1), encode_keys([])):
        dec = RecordStreamDecoder() if body.startswith(b"RRD1") else KeyListDecoder()
        dec.feed(body[:cut])
        assert dec.next_event() is None
        with pytest.raises(ProtocolError, match="header"):
            dec.finish()


def test_decoder_rejects_bad_magic_as_soon_as_it_differs() -> None:
    dec = RecordStreamDecoder()
    dec.feed(b"RRX")
    with pytest.raises(ProtocolError, match="magic") as ei:
        dec.next_event()
    assert ei.value.offset == 0
    with pytest.raises(ProtocolError):  # the decoder stays failed
        dec.feed(b"1")
    dec = KeyListDecoder()
    dec.feed(b"RRD1")  # a record stream sent to the keys endpoint
    with pytest.raises(ProtocolError, match="magic"):
        dec.next_event()


def test_decoder_rejects_record_count_above_max_at_header() -> None:
    dec = RecordStreamDecoder(max_count=2)
    dec.feed(encode_records_header(3))
    with pytest.raises(ProtocolError) as ei:
        dec.next_event()
    assert ei.value.offset == 4


def test_decoder_rejects_giant_length_before_payload() -> None:
    header = encode_records_header(1)
    for frame in (
        raw_frame(5, 0xFFFFFFFF, 0xFFFFFFFF, CODEC_RAW),
        raw_frame(5, 4096, 0xFFFFFFFF, CODEC_ZSTD),
        raw_frame(5, 4096, MAX_STORED_LENGTH + 1, CODEC_ZSTD),
        raw_frame(5, MAX_BLOCK_SIZE + 1, MAX_BLOCK_SIZE + 1, CODEC_RAW),
    ):
        dec = RecordStreamDecoder()
        dec.feed(header + frame)  # header only, no payload byte sent
        with pytest.raises(ProtocolError) as ei:
            dec.next_event()
        assert ei.value.index == 5
        assert ei.value.offset in (8 + 40, 8 + 44)


def test_decoder_rejects_raw_length_above_session_block_size() -> None:
    dec = RecordStreamDecoder(max_raw=4096)
    dec.feed(encode_records_header(1) + raw_frame(3, 4097, 4097, CODEC_RAW))
    with pytest.raises(ProtocolError, match="raw length"):
        dec.next_event()


def test_decoder_rejects_frame_that_would_exceed_batch_bytes_at_header() -> None:
    dec = RecordStreamDecoder(max_bytes=8 + 49 + 100)
    dec.feed(encode_records_header(1) + raw_frame(0, 101, 101, CODEC_RAW))
    with pytest.raises(ProtocolError, match="batch limit"):
        dec.next_event()


@pytest.mark.parametrize("codec", [2, 255])
def test_decoder_rejects_bad_codec(codec: int) -> None:
    dec = RecordStreamDecoder()
    dec.feed(encode_records_header(1) + raw_frame(9, 3, 3, codec, b"abc"))
    with pytest.raises(ProtocolError, match="codec") as ei:
        dec.next_event()
    assert ei.value.offset == 8 + 48 and ei.value.index == 9


def test_decoder_rejects_codec_0_stored_length_different_from_raw_length() -> None:
    for stored in (2, 4):
        dec = RecordStreamDecoder()
        dec.feed(encode_records_header(1) + raw_frame(0, 3, stored, CODEC_RAW, b"abcd"))
        with pytest.raises(ProtocolError, match="stored length"):
            dec.next_event()


def test_decoder_rejects_truncated_frame_header() -> None:
    body = records_body([(0, os.urandom(100))])[:-10]
    with pytest.raises(ProtocolError, match="frame header") as ei:
        list(iter_records(body[: 8 + 20]))
    assert ei.value.offset == 8
    with pytest.raises(ProtocolError, match="payload") as ei:
        list(iter_records(body))
    assert ei.value.offset == 8 and ei.value.index == 0


def test_decoder_rejects_length_past_the_end_of_body() -> None:
    body = encode_records_header(1) + raw_frame(4, 100, 100, CODEC_RAW, b"x" * 60)
    dec = RecordStreamDecoder()
    dec.feed(body)
    assert dec.next_event() is None  # waits for the rest of the payload
    with pytest.raises(ProtocolError, match="payload") as ei:
        dec.finish()
    assert ei.value.index == 4


def test_decoder_rejects_count_larger_than_frames_present() -> None:
    body = encode_records_header(3) + records_body([(0, b"abc")])[8:]
    frames = []
    with pytest.raises(ProtocolError, match="1 of 3"):
        frames.extend(iter_records(body))
    assert len(frames) == 1


def test_decoder_rejects_trailing_garbage_after_last_frame() -> None:
    body = records_body([(0, b"abc")]) + b"\0"
    with pytest.raises(ProtocolError, match="trailing") as ei:
        list(iter_records(body))
    assert ei.value.offset == len(body) - 1


def test_decoder_does_not_check_zstd_payload_or_duplicates() -> None:
    # A zstd payload decompressing to a different length passes the framing...
    frame = zstandard.ZstdCompressor().compress(b"a" * 5000)
    body = encode_records_header(2)
    body += encode_record(1, b"k" * 32, 4096, CODEC_ZSTD, frame)
    body += encode_record(1, b"k" * 32, 4096, CODEC_ZSTD, frame)
    frames = list(iter_records(body))
    assert [f.index for f in frames] == [1, 1]  # duplicates are the server's business
    # ...and is rejected by decompress_record.
    with pytest.raises(ProtocolError):
        decompress_record(frames[0].codec, frames[0].payload, frames[0].raw_length)


def test_decoder_is_fast_and_zero_copy_for_a_whole_32_mib_body() -> None:
    blocks = [(i, os.urandom(65536)) for i in range(500)]
    body = records_body(blocks)
    assert len(body) <= MAX_RAWDATA_BATCH_BYTES
    frames = list(iter_records(body))
    assert len(frames) == 500
    assert all(isinstance(f.payload, memoryview) for f in frames)
    assert bytes(frames[-1].payload) == blocks[-1][1]


def test_decoder_is_linear_when_fed_one_byte_at_a_time() -> None:
    body = records_body([(i, make_block(i, 65536, compressible=False)) for i in range(8)])
    dec = RecordStreamDecoder()
    frames = []
    for i in range(len(body)):
        dec.feed(body[i : i + 1])
        while (f := dec.next_event()) is not None:
            frames.append(f)
    dec.finish()
    assert plain(frames) == plain(list(iter_records(body)))


def test_finish_refuses_to_drop_undelivered_events() -> None:
    dec = KeyListDecoder()
    dec.feed(encode_keys([KeyEntry(0, b"k" * 32, 1)]))
    with pytest.raises(RuntimeError):
        dec.finish()
    assert dec.next_event() == KeyEntry(0, b"k" * 32, 1)
    dec.finish()
    assert dec.done


def test_encoders_reject_invalid_input() -> None:
    with pytest.raises(ProtocolError):
        encode_keys([KeyEntry(0, b"short", 1)])
    with pytest.raises(ProtocolError):
        encode_keys([KeyEntry(0, b"k" * 32, 0)])
    with pytest.raises(ProtocolError):
        encode_record(0, b"k" * 32, 4, CODEC_RAW, b"abc")
    with pytest.raises(ProtocolError):
        encode_record(0, b"k" * 32, 3, 2, b"abc")
    with pytest.raises(ProtocolError):
        encode_records_header(MAX_RECORDS_PER_BATCH + 1)


# --------------------------------------------------------------------------- properties

cuts_st = st.lists(st.integers(min_value=0, max_value=2000), max_size=12)


@FAST
@given(data=st.binary(max_size=400), cuts=cuts_st)
def test_key_decoder_raises_only_protocol_error_on_arbitrary_bytes(
    data: bytes, cuts: list[int]
) -> None:
    for body in (data, b"RKY1" + data):
        with contextlib.suppress(ProtocolError):
            feed_chunked(KeyListDecoder(max_count=8), body, cuts)


@FAST
@given(data=st.binary(max_size=600), cuts=cuts_st, prefix=st.booleans())
def test_record_decoder_raises_only_protocol_error_on_arbitrary_bytes(
    data: bytes, cuts: list[int], prefix: bool
) -> None:
    body = encode_records_header(2) + data if prefix else data
    try:
        frames = feed_chunked(RecordStreamDecoder(max_raw=4096), body, cuts)
    except ProtocolError:
        return
    for f in frames:
        with contextlib.suppress(ProtocolError):
            decompress_record(f.codec, f.payload, f.raw_length)


@FAST
@given(data=st.binary(max_size=200))
def test_decode_missing_raises_only_protocol_error(data: bytes) -> None:
    for body in (data, b"RMS1" + data):
        with contextlib.suppress(ProtocolError):
            decode_missing(body)


entries_st = st.lists(
    st.builds(
        KeyEntry,
        st.integers(min_value=0, max_value=2**64 - 1),
        st.binary(min_size=32, max_size=32),
        st.integers(min_value=1, max_value=MAX_BLOCK_SIZE),
    ),
    max_size=20,
)


@FAST
@given(entries=entries_st, cuts=st.lists(st.integers(min_value=0, max_value=900), max_size=30))
def test_key_list_round_trip_under_any_chunking(entries: list[KeyEntry], cuts: list[int]) -> None:
    body = encode_keys(entries)
    dec = KeyListDecoder()
    assert feed_chunked(dec, body, cuts) == entries
    assert dec.count == len(entries)


records_st = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2**64 - 1),
        st.one_of(
            st.binary(min_size=1, max_size=300),
            st.integers(min_value=1, max_value=3000).map(lambda n: b"z" * n),
        ),
    ),
    max_size=8,
)


@FAST
@given(blocks=records_st, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_record_stream_round_trip_under_any_chunking(
    blocks: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    body = records_body(blocks)
    frames = feed_chunked(RecordStreamDecoder(), body, cuts)
    assert plain(frames) == plain(list(iter_records(body)))
    got = [(f.index, decompress_record(f.codec, f.payload, f.raw_length)) for f in frames]
    assert got == blocks
    assert all(f.key == record_key(raw) for f, (_, raw) in zip(frames, blocks, strict=True))


@FAST
@given(indices=st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=50))
def test_missing_round_trip(indices: list[int]) -> None:
    assert decode_missing(encode_missing(indices)) == indices


@FAST
@given(
    blocks=records_st,
    pos=st.integers(min_value=0, max_value=10_000),
    byte=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=0, max_value=10_000),
    cuts=cuts_st,
)
def test_mutated_record_stream_raises_only_protocol_error(
    blocks: list[tuple[int, bytes]], pos: int, byte: int, cut: int, cuts: list[int]
) -> None:
    body = bytearray(records_body(blocks))
    body[pos % len(body)] = byte
    mutated = bytes(body[: max(cut, len(body) // 2)])
    try:
        frames = feed_chunked(RecordStreamDecoder(), mutated, cuts)
    except ProtocolError:
        return
    for f in frames:
        with contextlib.suppress(ProtocolError):
            decompress_record(f.codec, f.payload, f.raw_length)


@FAST
@given(
    entries=entries_st,
    pos=st.integers(min_value=0, max_value=1000),
    byte=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=0, max_value=1000),
    cuts=cuts_st,
)
def test_mutated_key_list_raises_only_protocol_error(
    entries: list[KeyEntry], pos: int, byte: int, cut: int, cuts: list[int]
) -> None:
    body = bytearray(encode_keys(entries))
    body[pos % len(body)] = byte
    with contextlib.suppress(ProtocolError):
        feed_chunked(KeyListDecoder(), bytes(body[: max(cut, len(body) // 2)]), cuts)
