"""staged_dir: an output folder appears whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterlab.staging import check_output_dir, staged_dir


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_success_renames_the_stage_into_place(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out"
    with staged_dir(out) as stage:
        assert stage.parent == out.parent and stage != out and not out.exists()
        (stage / "a.txt").write_text("x", encoding="utf-8")
    assert (out / "a.txt").read_text(encoding="utf-8") == "x"
    assert _listing(tmp_path) == ["sub", "sub/out", "sub/out/a.txt"]  # no stage or backup left


def test_an_error_leaves_nothing_and_keeps_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"), staged_dir(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("new", encoding="utf-8")
        raise RuntimeError("boom")
    assert _listing(tmp_path) == ["out", "out/old.txt"]


def test_overwrite_replaces_the_whole_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    with staged_dir(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("new", encoding="utf-8")
    assert _listing(tmp_path) == ["out", "out/new.txt"]


def test_refusals_name_the_path(tmp_path: Path) -> None:
    afile = tmp_path / "f"
    afile.write_text("", encoding="utf-8")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        check_output_dir(afile)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"'.*full' exists and is not empty \(pass overwrite=True"):
        with staged_dir(full):
            pass  # pragma: no cover
    assert _listing(full) == ["x"]
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"  # a missing folder is fine


def test_a_path_that_cannot_become_a_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"output '.*a-file/sub' cannot be created: '.*a-file' is a file"):
        check_output_dir(afile / "sub")
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match=r"output '.*dangling' is a link to nothing"):
        check_output_dir(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "dangling"]


def test_prune_under_a_file_is_one_line_before_loading(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adapterlab.cli.app import app

    afile = tmp_path / "a-file"
    afile.write_text("", encoding="utf-8")
    res = CliRunner().invoke(app, ["prune", "--method", "magnitude", "-o", str(afile / "sub")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot be created" in lines[0] and "is a file, not a folder" in lines[0], res.output


def test_a_staged_folder_lands_with_the_umask_default_permissions(tmp_path):
    """mkdtemp makes the stage 0700 and mkstemp makes files 0600; the landed output has the umask's modes."""
    import os
    import tempfile

    from adapterlab.staging import staged_dir

    old = os.umask(0o027)
    try:
        with staged_dir(tmp_path / "out") as stage:
            (stage / "sub").mkdir(mode=0o700)
            fd, name = tempfile.mkstemp(dir=stage / "sub")  # 0600
            os.close(fd)
            (stage / "a.json").write_text("{}")
            os.chmod(stage / "a.json", 0o600)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "sub").stat().st_mode & 0o777 == 0o750
    assert (out / "a.json").stat().st_mode & 0o777 == 0o640
    assert (out / "sub" / Path(name).name).stat().st_mode & 0o777 == 0o640
