import os

import pytest

from vlreason.outputs import OutputPathError, prepare_output


def test_creates_missing_parents_for_a_file(tmp_path):
    out = prepare_output(tmp_path / "a" / "b" / "report.json")
    assert out.parent.is_dir() and not out.exists()
    assert list(out.parent.iterdir()) == []  # the write probe leaves nothing behind


def test_creates_a_missing_folder(tmp_path):
    out = prepare_output(tmp_path / "x" / "run", is_dir=True)
    assert out.is_dir()


def test_a_file_where_a_folder_is_wanted_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputPathError, match="is a file"):
        prepare_output(tmp_path / "f", is_dir=True)
    with pytest.raises(OutputPathError, match="cannot write"):
        prepare_output(tmp_path / "f" / "report.json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="cannot write"):
            prepare_output(ro / "report.json")
    finally:
        ro.chmod(0o700)


def test_unwritable_location_is_refused_even_for_root():
    # /proc accepts no new folders, whoever asks: the check must say so before any work
    with pytest.raises(OutputPathError, match="cannot write to /proc/vlreason-test"):
        prepare_output("/proc/vlreason-test/report.json")
