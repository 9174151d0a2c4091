"""vitrail.data's image-folder checks on entries that are no image file."""

import os
import subprocess
import sys
import textwrap

import pytest

from vitrail.data import scan_image_folder

from .test_training_reliability import gray_folder

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need os.mkfifo (POSIX)")


def test_named_pipe_is_skipped_with_the_other_files(tmp_path, caplog):
    data = gray_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3)
    os.mkfifo(data / "cat" / "x.png")
    (data / "dog" / "notes.txt").write_text("labels")
    classes = scan_image_folder(data, "train")
    assert [file.name for file in classes["cat"]] == ["0.png", "1.png", "2.png"]
    assert (
        "skipped 2 files: cat/x.png (not a regular file), dog/notes.txt (unsupported format)" in caplog.text
    )


def test_data_check_of_a_folder_with_a_named_pipe_finishes(tmp_path):
    """The whole check (scan, then decode every image) in a child process with a time limit: reading a named pipe
    waits for a writer that never comes, so a check that opens one would never return."""
    data = gray_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3)
    os.mkfifo(data / "cat" / "x.png")
    code = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
        from vitrail.data import image_folder_dataset, image_problem
        splits, skipped = image_folder_dataset(sys.argv[1])
        print("rows", len(splits["train"]), "left out", skipped)
        print("problem:", image_problem(sys.argv[2]))
        """
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, str(data), str(data / "cat" / "x.png")],
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the data check was still waiting after 180 s: it opened the named pipe")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 files: cat/x.png (not a regular file)" in result.stdout
    assert "rows 6 left out {}" in result.stdout
    assert "problem: not a regular file" in result.stdout
