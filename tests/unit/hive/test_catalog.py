"""Model ids, references and the rule that nothing outside the models dir is reachable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rbee.common.bundled import BundledModel
from rbee.common.errors import BadRequest, NotFound
from rbee.hive.catalog import Catalog, HubFile


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    root = tmp_path / "models"
    for rel in ["org/repo/a.gguf", "org/repo/sub/b.gguf", "loose.gguf", "team/c.safetensors"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 7)
    (root / ".partial" / "job").mkdir(parents=True)
    (root / ".partial" / "job" / "file.gguf").write_bytes(b"half")
    (root / "readme.md").write_text("not a model")
    (tmp_path / "outside.gguf").write_bytes(b"secret")
    (root / "link.gguf").symlink_to(tmp_path / "outside.gguf")
    bundled = BundledModel(id="tiny-bundled", name="Tiny", package="nope_pkg", filename="x.gguf")
    return Catalog(root, bundled={"tiny-bundled": bundled})


def test_ids_follow_the_documented_scheme(catalog: Catalog) -> None:
    entries = {m.id: m for m in catalog.models()}
    assert sorted(entries) == [
        "loose.gguf",
        "org/repo:a.gguf",
        "org/repo:sub/b.gguf",
    ]  # team/c.safetensors is left out: no worker could load it
    assert entries["org/repo:a.gguf"].source == "huggingface"
    assert entries["loose.gguf"].source == "local"
    assert entries["loose.gguf"].format == "gguf"
    assert entries["org/repo:sub/b.gguf"].size_bytes == 7


def test_a_hub_file_is_stored_under_its_repo(catalog: Catalog) -> None:
    hub = HubFile.parse("org/repo:sub/b.gguf")
    assert catalog.path_for(hub) == catalog.root / "org" / "repo" / "sub" / "b.gguf"
    assert catalog.resolve(hub.id).path == str(catalog.path_for(hub))


@pytest.mark.parametrize(
    "ref", ["org/repo:a.gguf", "org/repo/a.gguf", "./org/repo/a.gguf", "org/x/../repo/a.gguf"]
)
def test_references_inside_the_models_dir_resolve(catalog: Catalog, ref: str) -> None:
    assert catalog.resolve(ref).id == "org/repo:a.gguf"


def test_an_absolute_path_inside_resolves(catalog: Catalog) -> None:
    assert catalog.resolve(str(catalog.root / "loose.gguf")).id == "loose.gguf"


@pytest.mark.parametrize(
    "ref",
    [
        "../outside.gguf",
        "/etc/passwd",
        "link.gguf",
        ".partial/job/file.gguf",
        "org/repo:../../x.gguf",
        "-m",
        "a\x00b",
        "a\\b.gguf",
    ],
)
def test_references_that_leave_the_models_dir_are_refused(catalog: Catalog, ref: str) -> None:
    with pytest.raises(BadRequest):
        catalog.resolve(ref)


@pytest.mark.parametrize("ref", ["nothing", "org/repo:zzz.gguf", "readme.md", "tiny-bundled"])
def test_unknown_references_are_not_found(catalog: Catalog, ref: str) -> None:
    with pytest.raises(NotFound):
        catalog.resolve(ref)


def test_symlinks_out_and_partials_are_not_listed(catalog: Catalog) -> None:
    ids = catalog.ids()
    assert "link.gguf" not in ids
    assert not any("partial" in i for i in ids)


def test_delete_removes_the_file_and_empty_folders(catalog: Catalog) -> None:
    catalog.delete("org/repo:sub/b.gguf")
    assert not (catalog.root / "org" / "repo" / "sub").exists()
    assert (catalog.root / "org" / "repo" / "a.gguf").exists()
    catalog.delete("org/repo:a.gguf")
    assert not (catalog.root / "org").exists()
    assert catalog.root.exists()


def test_discarding_partials_keeps_recent_broken_off_downloads_for_a_resume(
    catalog: Catalog,
) -> None:
    kept = catalog.partial_dir / "0123abcd.part"
    kept.write_bytes(b"GGUF half")
    old = catalog.partial_dir / "old.part"
    old.write_bytes(b"GGUF")
    os.utime(old, (0, 0))
    catalog.discard_partials()
    assert sorted(p.name for p in catalog.partial_dir.iterdir()) == ["0123abcd.part"]


@pytest.mark.parametrize(
    "ref",
    [
        "org/repo",
        "repo:file.gguf",
        "org/repo/extra:file.gguf",
        "org/repo:file.bin",
        "org/re--po:f.gguf",
        "org/..:f.gguf",
        "org/repo:.hidden.gguf",
        "org/repo:a//b.gguf",
        "org/repo:",
        "org/rep o:f.gguf",
    ],
)
def test_hub_references_must_look_like_org_repo_file(ref: str) -> None:
    with pytest.raises(BadRequest):
        HubFile.parse(ref)


def test_a_good_hub_reference_parses() -> None:
    hub = HubFile.parse("bartowski/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct-Q4_K_M.gguf")
    assert hub.repo_id == "bartowski/SmolLM2-135M-Instruct-GGUF"
    assert hub.filename == "SmolLM2-135M-Instruct-Q4_K_M.gguf"
