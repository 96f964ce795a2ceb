"""Malformed stores: byte flips, truncations, preamble and index edits. Every failure must be a
FormatError (ChecksumError is one) naming the place; never another exception, a hang, a read
outside the file, or an allocation of what a header merely claims."""
import json
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moestream
from moestream.errors import ChecksumError, FormatError
from moestream.formats import StoreReader, checksum
from moestream.formats.constants import FORMAT_VERSION, PREAMBLE_STRUCT

SETTINGS = settings(max_examples=int(__import__("os").environ.get("MOESTREAM_FUZZ_EXAMPLES", 60)), deadline=5000, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def pristine(checkpoints, sharded_bf16_checkpoint, tmp_path_factory):
    """Three stores (shuffle+zstd wherever it saves a page, raw, int4) and their decoded contents.
    The zstd one is of the bf16 Mixtral with 192 KiB experts: the tiny fp32 models' experts are
    too small for zstd to save a whole 4 KiB page, so the converter keeps them raw."""
    root = tmp_path_factory.mktemp("pristine")
    stores = {}
    for name, kw in {"zstd": {"zstd_min_saving": 0}, "raw": {"zstd_level": None}, "int4": {"quant": "int4"}}.items():
        src = sharded_bf16_checkpoint if name == "zstd" else checkpoints["qwen2_moe"]
        out = moestream.convert(src, root / name, progress=False, **kw)
        with StoreReader(out) as r:
            stores[name] = (out, read_everything(r))
            if name == "zstd":   # the codec paths these tests corrupt are there
                chains = {s for reg in r.index.extents.values() for s in reg.chain}
                assert {"zstd", "shuffle"} <= chains, chains
    return stores


def read_everything(r: StoreReader):
    out = {f"{l}/{e}": r.expert(l, e) for l in r.layers for e in range(r.experts_per_layer)}
    out["dense"] = r.dense()
    return out


def same(a, b):
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)
        for x, y in ((a[k], b[k]) for k in a))


def copy_store(src, dst):
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst / "experts-00000.moe"


def open_and_read(path, verify=True):
    with StoreReader(path, verify=verify) as r:
        return read_everything(r)


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(["zstd", "raw", "int4"]))
def test_random_byte_flips(pristine, tmp_path_factory, data, kind):
    src, expected = pristine[kind]
    dst = tmp_path_factory.mktemp("flip") / "s"
    f = copy_store(src, dst)
    size = f.stat().st_size
    buf = bytearray(f.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, size - 1))
        buf[pos] ^= data.draw(st.integers(1, 255))
    f.write_bytes(buf)
    try:
        got = open_and_read(dst)
    except FormatError as e:
        assert str(f) in str(e) or str(dst) in str(e)
        assert "offset" in str(e)
    else:
        # only the zero padding between regions is not covered by a checksum
        assert same(got, expected)


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(["zstd", "raw", "int4"]))
def test_random_byte_flips_without_verification(pristine, tmp_path_factory, data, kind):
    """verify=False may return wrong numbers for flipped raw bytes, but never anything but
    tensors or a FormatError."""
    src, _ = pristine[kind]
    dst = tmp_path_factory.mktemp("flipnv") / "s"
    f = copy_store(src, dst)
    buf = bytearray(f.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(4096, len(buf) - 1))
        buf[pos] ^= data.draw(st.integers(1, 255))
    f.write_bytes(buf)
    try:
        open_and_read(dst, verify=False)
    except FormatError:
        pass


@SETTINGS
@given(data=st.data())
def test_truncations(pristine, tmp_path_factory, data):
    src, _ = pristine["zstd"]
    dst = tmp_path_factory.mktemp("trunc") / "s"
    f = copy_store(src, dst)
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(data.draw(st.integers(0, size - 1)))
    with pytest.raises(FormatError) as e:
        open_and_read(dst)
    assert str(f) in str(e.value)


def repack_index(f, edit):
    """Apply `edit` to the parsed index and rewrite it with a *valid* checksum, as a buggy or
    hostile writer would: only structural validation can catch it then."""
    buf = bytearray(f.read_bytes())
    fields = list(PREAMBLE_STRUCT.unpack_from(buf))
    ioff, ilen = fields[6], fields[7]
    doc = json.loads(buf[ioff:ioff + ilen])
    edit(doc)
    new = json.dumps(doc).encode()
    fields[7], fields[8] = len(new), int(checksum(new), 16)
    head = PREAMBLE_STRUCT.pack(*fields)
    head += struct.pack("<Q", int(checksum(head), 16))
    buf[:len(head)] = head
    f.write_bytes(bytes(buf[:ioff]) + new)


def _paths(doc, prefix=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k != "config":
                yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))
    else:
        yield prefix


@SETTINGS
@given(data=st.data())
def test_index_edits_with_valid_checksum(pristine, tmp_path_factory, data):
    src, expected = pristine["zstd"]
    dst = tmp_path_factory.mktemp("idx") / "s"
    f = copy_store(src, dst)
    buf = f.read_bytes()
    fields = PREAMBLE_STRUCT.unpack_from(buf)
    doc = json.loads(buf[fields[6]:fields[6] + fields[7]])
    paths = sorted(_paths(doc), key=str)
    path = data.draw(st.sampled_from(paths))
    value = data.draw(st.one_of(st.integers(-2, 2**63), st.sampled_from([1 << 40, 4096, 0, -1, "x", None, [], 1.5]),
                                st.text(max_size=4)))

    def edit(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    repack_index(f, edit)
    try:
        got = open_and_read(dst)
    except FormatError as e:
        assert str(f) in str(e)
    else:
        assert same(got, expected)  # the edit hit a field that does not change the data


def preamble_edit(f, index, value):
    buf = bytearray(f.read_bytes())
    fields = list(PREAMBLE_STRUCT.unpack_from(buf))
    fields[index] = value
    head = PREAMBLE_STRUCT.pack(*fields)
    head += struct.pack("<Q", int(checksum(head), 16))
    buf[:len(head)] = head
    f.write_bytes(buf)


@pytest.mark.parametrize("index,value,message", [
    (0, b"NOTMOES\x00", "not a moestream store"),
    (1, FORMAT_VERSION + 1, f"format version {FORMAT_VERSION + 1}"),
    (2, 8192, "preamble size"),
    (5, 0, "file count"),
    (5, 3, "missing"),
    (6, 1 << 60, "index at"),
    (7, 1 << 62, "exceeds the .*-byte limit"),
    (8, 12345, "index checksum"),
])
def test_preamble_edits(pristine, tmp_path, index, value, message):
    src, _ = pristine["zstd"]
    f = copy_store(src, tmp_path / "s")
    preamble_edit(f, index, value)
    with pytest.raises(FormatError, match=message) as e:
        open_and_read(tmp_path / "s")
    assert str(f) in str(e.value) or str(tmp_path / "s") in str(e.value)


def test_huge_claimed_sizes_are_refused_before_allocation(pristine, tmp_path):
    src, _ = pristine["zstd"]
    f = copy_store(src, tmp_path / "s")

    def claim(d):
        d["extents"][0]["tensors"][0]["shape"] = [1 << 30, 1 << 10]
    repack_index(f, claim)
    with pytest.raises(FormatError, match="does not match shape"):
        open_and_read(tmp_path / "s")

    f = copy_store(src, tmp_path / "s")

    def raw(d):
        d["extents"][3]["raw_length"] = 1 << 45
    repack_index(f, raw)
    with pytest.raises(FormatError, match="layer 0 expert 3"):
        open_and_read(tmp_path / "s")


def test_checksum_error_names_file_offset_and_extent(pristine, tmp_path):
    src, _ = pristine["zstd"]
    f = copy_store(src, tmp_path / "s")
    with StoreReader(tmp_path / "s") as r:
        reg = r.extent(1, 5)
    with open(f, "r+b") as fh:
        fh.seek(reg.offset + 10)
        b = fh.read(1)
        fh.seek(reg.offset + 10)
        fh.write(bytes([b[0] ^ 0xFF]))
    with StoreReader(tmp_path / "s") as r:
        r.expert(1, 4)
        with pytest.raises(ChecksumError) as e:
            r.expert(1, 5)
        assert str(f) in str(e.value) and f"offset {reg.offset}" in str(e.value) and "layer 1 expert 5" in str(e.value)
        assert r.verify_all() == [f"{f}: offset {reg.offset}: layer 1 expert 5: checksum mismatch"]


def test_not_a_store(tmp_path):
    with pytest.raises(FormatError, match="no such store"):
        StoreReader(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(FormatError, match="directory"):
        StoreReader(tmp_path / "file")
    with pytest.raises(FormatError, match="no experts-00000.moe"):
        StoreReader(tmp_path)


# ---- decompression bombs: declared sizes are bounded before anything is allocated ---------------

def plant_region(f, data: bytes, edit):
    """Write `data` at the aligned end of file 0's data (where the index was) and rewrite the
    index after it with valid checksums; `edit(doc, offset, length, checksum)` points a region
    of the index at the planted bytes. A hostile writer could do exactly this."""
    from moestream.formats.constants import align_up
    buf = bytearray(f.read_bytes())
    fields = list(PREAMBLE_STRUCT.unpack_from(buf))
    ioff, ilen = fields[6], fields[7]
    doc = json.loads(buf[ioff:ioff + ilen])
    edit(doc, ioff, len(data), checksum(data))
    new_ioff = align_up(ioff + len(data))
    doc["files"][0]["size"] = new_ioff
    new = json.dumps(doc).encode()
    fields[6], fields[7], fields[8] = new_ioff, len(new), int(checksum(new), 16)
    head = PREAMBLE_STRUCT.pack(*fields)
    head += struct.pack("<Q", int(checksum(head), 16))
    buf[:len(head)] = head
    f.write_bytes(bytes(buf[:ioff]) + data + bytes(new_ioff - ioff - len(data)) + new)


def _as_blob(name, raw_length):
    def edit(doc, offset, length, digest):
        doc["blobs"][name] = {"file": 0, "offset": offset, "length": length, "raw_length": raw_length,
                              "checksum": digest, "chain": ["zstd"]}
    return edit


def forged_frame(content_size: int) -> bytes:
    """A 17-byte zstd frame whose header claims `content_size` bytes: one RLE block of 1 byte."""
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + content_size.to_bytes(8, "little") + bytes([0x0B, 0, 0]) + b"\x00"


def test_tiny_frame_claiming_a_terabyte_is_refused(pristine, tmp_path):
    src, _ = pristine["zstd"]
    f = copy_store(src, tmp_path / "s")
    plant_region(f, forged_frame(1 << 40), _as_blob("tokenizer.json", 1 << 40))
    with pytest.raises(FormatError, match=r"raw_length 1099511627776 is more than a 17-byte zstd frame") as e:
        StoreReader(tmp_path / "s")
    assert str(f) in str(e.value)


def test_blob_that_decompresses_to_a_gigabyte_is_refused(pristine, tmp_path):
    import zstandard
    src, _ = pristine["zstd"]
    f = copy_store(src, tmp_path / "s")
    size = 1 << 30
    c = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    zeros = bytes(1 << 20)
    frame = b"".join(c.compress(zeros) for _ in range(size // len(zeros))) + c.flush()
    assert len(frame) < 64 << 10  # a real frame, small on disk, huge once decoded
    plant_region(f, frame, _as_blob("tokenizer.json", size))
    with pytest.raises(FormatError, match="exceeds the .*-byte limit of a carried file"):
        StoreReader(tmp_path / "s")


def test_trailing_frames_are_refused_and_verify_decodes(pristine, tmp_path):
    import zstandard
    from moestream.cli import main
    src, _ = pristine["zstd"]
    f = copy_store(src, tmp_path / "s")
    first = zstandard.ZstdCompressor().compress(b'{"a": 1}' * 100)
    plant_region(f, first + zstandard.ZstdCompressor().compress(b"x" * 1000), _as_blob("extra.json", 800))
    with StoreReader(tmp_path / "s") as r:
        with pytest.raises(FormatError, match="bytes after its zstd frame"):
            r.blob("extra.json")
        bad = r.verify_all()
    assert len(bad) == 1 and "bytes after its zstd frame" in bad[0] and "blob extra.json" in bad[0]
    assert main(["verify", str(tmp_path / "s")]) == 1

    f = copy_store(src, tmp_path / "s")  # one whole frame, but not JSON: verify says so, as generate would fail
    plant_region(f, zstandard.ZstdCompressor().compress(b"not json" * 50), _as_blob("tokenizer.json", 400))
    with StoreReader(tmp_path / "s") as r:
        bad = r.verify_all()
    assert len(bad) == 1 and "tokenizer.json" in bad[0] and "not valid JSON" in bad[0]


@pytest.mark.parametrize("store,flags,message", [
    ("raw", {"raw": True}, "'raw' is for a tensor of a quantized region"),
    ("raw", {"transposed": True}, "'transposed' is for a tensor of a quantized region"),
    ("int4", {"transposed": "yes"}, "field 'transposed' has type str"),
    ("int4", {"raw": True}, "does not match shape"),                       # its bytes are int4 planes, not raw
    ("int4", {"raw": True, "transposed": True}, "a transposed tensor is a quantized matrix"),
])
def test_tensor_flags_that_do_not_fit_their_region_are_refused(pristine, tmp_path, store, flags, message):
    """TensorSlice.raw / .transposed (a GPT-OSS MXFP4 expert's biases and matrices): only in a
    quantized region, booleans, and a raw tensor's length must be its dtype's bytes."""
    src, _ = pristine[store]
    f = copy_store(src, tmp_path / "s")
    repack_index(f, lambda d: d["extents"][2]["tensors"][0].update(flags))
    with pytest.raises(FormatError, match=message) as e:
        open_and_read(tmp_path / "s")
    assert str(f) in str(e.value)
