"""ssl_container.utils.files: the one atomic-write helper."""
import json
import os

import pytest

from ssl_container.utils.files import atomic_path, atomic_write_json, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "meta.json"
    atomic_write_json(target, {"step": 1})
    with pytest.raises(RuntimeError, match="disk died"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"step": 2, "trunc')
            raise RuntimeError("disk died")
    assert json.loads(target.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_a_successful_write_replaces_and_gets_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "latest"
    atomic_write_text(target, "step_00000001")
    atomic_write_text(target, "step_00000002")
    assert target.read_text() == "step_00000002"
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["latest"]


def test_files_written_by_a_writer_that_recreates_them_honour_the_umask(tmp_path):
    # safetensors' save_file replaces the temporary file with a 0600 one; the checkpoint's weights must
    # still be readable by the group/others the umask allows, like meta.json and DeepSpeed's files.
    import stat

    import torch
    from safetensors.torch import save_file

    from ssl_container.utils.files import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "teacher.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        with atomic_path(tmp_path / "other.bin") as tmp:
            tmp.unlink()
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    for name in ("teacher.safetensors", "other.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
