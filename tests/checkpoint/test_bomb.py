"""A zip bomb in a ``.pt`` file (a compressed record inflating ~1000x) is refused before ``torch.load``."""

from __future__ import annotations

import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from cratevit import create_model, save_checkpoint, save_safetensors
from cratevit.checkpoint import load_checkpoint, read_checkpoint
from cratevit.checkpoint.read import check_zip_records
from cratevit.errors import CheckpointError

GIB = 1 << 30


def _deflated_zeros(total: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``total`` zero bytes (built from one compressed MiB repeated) and its CRC-32."""
    mib = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, history reset: repeatable
    crc = 0
    for _ in range(total >> 20):
        crc = zlib.crc32(mib, crc)
    return block * (total >> 20) + c.flush(), crc


def make_bomb(real: Path, out: Path, inflated: int = GIB) -> Path:
    """``real`` (a torch.save file) with its first storage record replaced by ``inflated`` deflated zero bytes:
    a valid zip whose local and central headers both declare method 8 (deflate) and the inflated size."""
    stream, crc = _deflated_zeros(inflated)
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = stream if info.filename.endswith("/data/0") else src.read(info)
            dst.writestr(zipfile.ZipInfo(info.filename), data)  # stored: the deflate stream as it is
    raw = bytearray(out.read_bytes())
    with zipfile.ZipFile(out) as z:
        target = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        central = z.start_dir
    local = target.header_offset  # local header: method at +8, crc at +14, sizes at +18 / +22
    struct.pack_into("<H", raw, local + 8, zipfile.ZIP_DEFLATED)
    struct.pack_into("<I", raw, local + 14, crc)
    struct.pack_into("<I", raw, local + 22, inflated)
    name = target.filename.encode()
    entry = raw.index(b"PK\x01\x02" + raw[central + 4 : central + 28], central)  # walk to the record's entry
    while raw[entry + 46 : entry + 46 + len(name)] != name:
        n, m, k = struct.unpack_from("<HHH", raw, entry + 28)
        entry += 46 + n + m + k
    struct.pack_into("<H", raw, entry + 10, zipfile.ZIP_DEFLATED)  # central entry: method +10, crc +16, size +24
    struct.pack_into("<I", raw, entry + 16, crc)
    struct.pack_into("<I", raw, entry + 24, inflated)
    out.write_bytes(bytes(raw))
    return out


@pytest.fixture()
def real_and_bomb(tmp_path) -> tuple[Path, Path]:
    real = save_checkpoint(tmp_path / "real.pt", create_model("crate_debug"))
    return real, make_bomb(real, tmp_path / "bomb.pt")


def test_the_bomb_is_a_valid_zip_whose_record_inflates_1000x(real_and_bomb) -> None:
    _, bomb = real_and_bomb
    size = bomb.stat().st_size
    assert size < 2 << 20  # about 1 MB on disk
    with zipfile.ZipFile(bomb) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        assert info.compress_type == zipfile.ZIP_DEFLATED and info.file_size == GIB
        with z.open(info) as f:  # the first MiB really inflates to zeros (the stream is well-formed)
            assert f.read(1 << 20) == bytes(1 << 20)
    assert GIB / size > 900


def test_the_bomb_is_refused_before_torch_load_with_little_memory(real_and_bomb, monkeypatch) -> None:
    _, bomb = real_and_bomb

    def never(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", never)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"refused unread: its record '.*data/0' is compressed") as e:
            read_checkpoint(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20
    assert "\n" not in str(e.value) and "torch.save writes only stored records" in str(e.value)
    with pytest.raises(CheckpointError, match="is compressed"):
        load_checkpoint(bomb)


def test_a_record_declaring_more_than_its_bytes_is_refused(real_and_bomb, tmp_path) -> None:
    real, _ = real_and_bomb
    raw = bytearray(real.read_bytes())
    with zipfile.ZipFile(real) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        central = z.start_dir
    name = info.filename.encode()
    entry = central
    while raw[entry + 46 : entry + 46 + len(name)] != name:
        n, m, k = struct.unpack_from("<HHH", raw, entry + 28)
        entry += 46 + n + m + k
    struct.pack_into("<I", raw, entry + 24, 1 << 31)  # stored, but declaring 2 GiB
    liar = tmp_path / "liar.pt"
    liar.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is oversized"):
        check_zip_records(liar)


def test_real_files_still_load(real_and_bomb, tmp_path) -> None:
    real, _ = real_and_bomb
    check_zip_records(real)  # torch.save's own file passes
    model = load_checkpoint(real)
    assert sum(p.numel() for p in model.parameters()) > 0
    legacy = tmp_path / "legacy.pt"  # the pre-zip torch.save format is not a zip: read by torch.load as before
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    check_zip_records(legacy)
    from cratevit.checkpoint.read import load_file

    assert torch.equal(load_file(legacy)["w"], torch.ones(3))
    st = save_safetensors(tmp_path / "model.safetensors", model)  # safetensors: another reader, unaffected
    state, _, meta = read_checkpoint(st)
    assert meta["family"] == "cratevit-safetensors" and state.keys() == model.state_dict().keys()
