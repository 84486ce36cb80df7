"""Reading damaged shards sample by sample, and writing output shards deterministically and atomically."""

import io
import json
import tarfile

import numpy as np
import pytest
from embed_helpers import write_shard

from dmt_jepa.serve.shards import ShardOutput, ShardReader, is_done, safe_key, split_key


def samples_of(data: bytes):
    reader = ShardReader(io.BytesIO(data))
    return [(s.key, dict(s.members), s.error) for s in reader], reader.cut


def five_samples(tmp_path):
    samples = [(f"k{i}", {"jpg": bytes([i]) * (700 + i), "cls": b"%d" % i}) for i in range(5)]
    return samples, write_shard(tmp_path / "s.tar", samples).read_bytes()


def test_groups_members_like_webdataset(tmp_path):
    long_dir = "d" * 120  # longer than a ustar name: stored through a pax header
    samples = [
        ("a/b/img1", {"jpg": b"x", "seg.png": b"y"}),
        (f"{long_dir}/img2", {"png": b"z"}),
        ("noext", {"": b"w"}),
    ]
    got, cut = samples_of(write_shard(tmp_path / "s.tar", samples).read_bytes())
    assert cut is None
    assert got == [(key, members, None) for key, members in samples]
    assert split_key("x/y.tar.d/z.seg.png") == ("x/y.tar.d/z", "seg.png")


def test_cut_mid_member_keeps_samples_before_and_names_the_cut_one(tmp_path):
    samples, data = five_samples(tmp_path)
    with tarfile.open(tmp_path / "s.tar") as tar:
        k3_image = tar.getmember("k3.jpg")
    got, cut = samples_of(data[: k3_image.offset_data + 100])
    assert [g[:2] for g in got[:3]] == [(k, m) for k, m in samples[:3]]
    assert got[3][0] == "k3" and "cut off inside member k3.jpg" in got[3][2]
    assert len(got) == 4 and "cut off" in cut


def test_cut_between_members_keeps_everything_and_records_missing_end(tmp_path):
    samples, data = five_samples(tmp_path)
    with tarfile.open(tmp_path / "s.tar") as tar:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())
    got, cut = samples_of(data[:end])
    assert [g[:2] for g in got] == [(k, m) for k, m in samples] and all(g[2] is None for g in got)
    assert "without the tar end marker" in cut


@pytest.mark.parametrize("data, words", [(b"", "empty"), (b"not a tar at all" * 64, "invalid tar header")])
def test_not_a_tar(data, words):
    got, cut = samples_of(data)
    assert got == [] and words in cut


def test_repeated_key_is_refused_after_the_first(tmp_path):
    samples = [("a", {"jpg": b"1"}), ("b", {"jpg": b"2"}), ("a", {"jpg": b"3"})]
    got, _ = samples_of(write_shard(tmp_path / "s.tar", samples).read_bytes())
    assert got[0] == ("a", {"jpg": b"1"}, None)
    assert got[2][0] == "a" and "appears again" in got[2][2]


def test_oversized_member_is_refused_unread(tmp_path):
    data = write_shard(tmp_path / "s.tar", [("a", {"jpg": b"1" * 5000}), ("b", {"jpg": b"2"})]).read_bytes()
    reader = ShardReader(io.BytesIO(data), max_member_bytes=1000)
    got = [(s.key, s.members, s.error) for s in reader]
    assert "5000 bytes" in got[0][2] and got[1] == ("b", {"jpg": b"2"}, None) and reader.cut is None


def write_one(out_dir, name):
    out = ShardOutput(out_dir, name)
    emb = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 7
    out.add("k0", emb, {"grid": [2, 3]}, pooled=emb.mean((0, 1)))
    out.fail("k1", "broken")
    return out, emb


def test_output_is_invisible_until_commit_then_deterministic(tmp_path):
    (tmp_path / "a").mkdir()
    first, emb = write_one(tmp_path / "a", "s")
    assert not (tmp_path / "a" / "s.tar").exists() and not is_done(tmp_path / "a", "s")
    first.commit({"shard": "s.tar"})
    (tmp_path / "b").mkdir()
    second, _ = write_one(tmp_path / "b", "s")
    second.commit({"shard": "s.tar"})
    assert (tmp_path / "a" / "s.tar").read_bytes() == (tmp_path / "b" / "s.tar").read_bytes()
    assert is_done(tmp_path / "a", "s") and sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s.json", "s.tar"]
    record = json.loads((tmp_path / "a" / "s.json").read_text())
    assert record["embedded"] == 1 and record["failures"] == [{"key": "k1", "reason": "broken"}]
    with tarfile.open(tmp_path / "a" / "s.tar") as tar:
        stored = np.load(io.BytesIO(tar.extractfile("k0.emb.npy").read()))
        assert tar.getnames() == ["k0.emb.npy", "k0.pooled.npy", "k0.json"]
    assert stored.dtype == np.float16 and np.array_equal(stored, emb.astype(np.float16))


def test_abort_leaves_nothing(tmp_path):
    out, _ = write_one(tmp_path, "s")
    out.abort()
    assert list(tmp_path.iterdir()) == []


def test_truncated_gzip_shard_keeps_what_came_before_and_accounts_for_the_rest(tmp_path):
    import gzip

    samples, data = five_samples(tmp_path)
    packed = gzip.compress(data)
    reader = ShardReader(gzip.open(io.BytesIO(packed[: len(packed) * 3 // 5])))
    got = [(s.key, s.members, s.error) for s in reader]
    assert [g[0] for g in got] == [k for k, _ in samples[: len(got)]] and 0 < len(got) < 5
    assert all(g[1] == dict(samples[i][1]) for i, g in enumerate(got) if g[2] is None)
    assert "EOFError" in reader.cut or "cut off" in reader.cut


def test_malformed_pax_header_is_a_cut_not_a_crash(tmp_path):
    data = write_shard(tmp_path / "s.tar", [("a", {"jpg": b"1"}), ("d" * 150 + "/b", {"jpg": b"2"})]).read_bytes()
    record = data.index(b" path=")  # preceded by the record's length in 3 digits
    got, cut = samples_of(data[: record - 3] + b"zzz" + data[record:])
    assert got == [("a", {"jpg": b"1"}, None)] and "invalid pax header" in cut


def raw_tar(members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A tar written member by member, names and headers exactly as given (hostile ones included)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info, data = member if isinstance(member, tuple) else (member, b"")
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def test_safe_key_is_injective_reversible_and_never_climbs():
    from urllib.parse import unquote

    keys = ["a/b/c", "../../x", "/abs/path", "a//b", "./a", "a/./b/..", "..", "%2E%2E", "a\\..\\b", "x\0y\nz", "\udcff", ""]
    safe = [safe_key(k) for k in keys]
    assert len(set(safe)) == len(keys)
    assert [unquote(s, errors="surrogateescape") for s in safe] == keys
    for name in safe:
        parts = name.split("/")
        assert not name.startswith("/") and "" not in parts[:-1] and not {".", ".."} & set(parts)
        assert not any(ord(c) < 0x20 for c in name) and "\\" not in name
    assert safe_key("a/b/c") == "a/b/c" and safe_key("../../x") == "%2E%2E/%2E%2E/x" and safe_key("/abs") == "%2Fabs"


def test_links_and_repeated_members_are_refused_with_a_reason():
    link = tarfile.TarInfo("l.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("h.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "a.jpg"
    folder = tarfile.TarInfo("dir")
    folder.type = tarfile.DIRTYPE
    data = raw_tar([regular("a.jpg", b"1"), link, hard, folder, regular("d.jpg", b"2"), regular("d.jpg", b"3")])
    got, cut = samples_of(data)
    assert cut is None and [g[0] for g in got] == ["a", "l", "h", "d"]
    assert "symbolic link (to /etc/passwd)" in got[1][2] and "hard link (to a.jpg)" in got[2][2]
    assert "d.jpg appears twice" in got[3][2]


class Zeros(io.RawIOBase):
    """A stream of `header` followed by zeros up to `size` bytes, counting what was read."""

    def __init__(self, header: bytes, size: int):
        self.header, self.size, self.pos = header, size, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.size - self.pos)
        chunk = (self.header[self.pos : self.pos + n]).ljust(n, b"\0")
        buffer[:n] = chunk
        self.pos += n
        return n


def test_pax_headers_are_bounded_and_malformed_ones_are_cuts(tmp_path):
    bad_size = tarfile.TarInfo("b.jpg")
    bad_size.pax_headers = {"size": "abc"}
    got, cut = samples_of(raw_tar([regular("a.jpg", b"1"), (bad_size, b"2"), regular("c.jpg", b"3")]))
    assert got == [("a", {"jpg": b"1"}, None)] and "invalid member size" in cut
    huge = tarfile.TarInfo("././@PaxHeader")
    huge.type, huge.size = tarfile.XHDTYPE, 300 << 20
    stream = Zeros(huge.tobuf(tarfile.USTAR_FORMAT), (300 << 20) + 1024)
    reader = ShardReader(stream)
    assert list(reader) == [] and "limit" in reader.cut and stream.pos < 1 << 20  # refused unread
