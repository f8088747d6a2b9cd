"""Tar shards (webdataset) as ``embed`` inputs: brace patterns, members keyed ``TAR::MEMBER``
in the tar's order, damaged members and tars named and skipped, rows equal to embedding the
same images as files. A tiny model and 28-pixel crops."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2_fast.embedding.sources import _braces, collect_inputs
from tests._models import hf_model


def _png(seed: int, height: int, width: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """00000.tar: two images, their JSON sidecars, a damaged image; 00001.tar: one image and
    a last image the tar was cut inside of (a partly copied shard)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_tar(
        folder / "00000.tar",
        [
            ("000/a.png", _png(0, 40, 30)),
            ("000/a.json", b"{}"),
            ("000/b.png", _png(1, 32, 48)),
            ("000/b.json", b"{}"),
            ("000/c.jpg", b"not a jpeg"),
        ],
    )
    cut = folder / "00001.tar"
    _write_tar(cut, [("001/d.png", _png(2, 36, 36)), ("001/e.png", _png(3, 30, 44))])
    with tarfile.open(cut) as tar:
        last = tar.getmember("001/e.png")
    cut.write_bytes(cut.read_bytes()[: last.offset_data + last.size // 2])
    return folder


def test_braces_expand_as_a_shell_does():
    assert _braces("s/{00000..00002}.tar") == [f"s/0000{i}.tar" for i in range(3)]
    assert _braces("{a,b}{9..10}") == ["a9", "a10", "b9", "b10"]
    assert _braces("plain.tar") == ["plain.tar"]


def test_tar_members_are_rows_in_tar_order(shards):
    listing = collect_inputs([str(shards / "{00000..00001}.tar")])
    names = [path.split("::")[1] for path in listing.paths]
    assert names == ["000/a.png", "000/b.png", "000/c.jpg", "001/d.png", "001/e.png"]
    assert listing.paths[0] == f"{shards / '00000.tar'}::000/a.png"
    assert listing.skipped == [
        (str(shards / "00001.tar"), "cannot list the tar past its member 2: unexpected end of data")
    ]
    assert collect_inputs([str(shards / "*.tar")]).paths == listing.paths


def test_embedding_tar_members_equals_embedding_the_files(shards, tmp_path):
    import json

    from dinov2_fast import embed
    from dinov2_fast.embedding import embed_images

    model = tmp_path / "model"
    hf_model().save_pretrained(model)
    (shards / "notes.tar").write_text("not a tar")
    out = tmp_path / "features.npy"
    result = embed_images(
        [str(shards / "{00000,00001,notes}.tar")],
        str(model),
        out,
        crop_size=28,
        device="cpu",
        workers=1,
        batch_size=1,
        show_progress=False,
    )
    assert (result.rows, result.skipped) == (3, 4)
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert [p.split("::")[1] for p in manifest["inputs"]] == ["000/a.png", "000/b.png", "001/d.png"]
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert "cannot list the tar:" in reasons[str(shards / "notes.tar")]
    assert "cannot list the tar past" in reasons[str(shards / "00001.tar")]
    assert "cannot identify the image format" in reasons[f"{shards / '00000.tar'}::000/c.jpg"]
    assert "the tar ends inside this member" in reasons[f"{shards / '00001.tar'}::001/e.png"]
    images = [_png(0, 40, 30), _png(1, 32, 48), _png(2, 36, 36)]
    expected = embed(images, str(model), crop_size=28, device="cpu", batch_size=1)
    np.testing.assert_array_equal(np.load(out), expected.numpy())
