"""The command's exit codes: a user error is one line `error: ...` and exit 2 (also from a DataLoader
worker); an internal error keeps its traceback and exits 1."""
import os
import subprocess
import sys

import pytest

from fastcbd.cli import main
from fastcbd.errors import BadInputError, ConfigError, UserError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from data_files import write_jpegs, write_list


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "o"), "seed=[1, 2]"]) == 2
    err = capsys.readouterr().err
    assert "error: config key 'seed': expected a number" in err and "Traceback" not in err, err
    (tmp_path / "list.txt").write_bytes(b"a.jpg \xff\n")
    assert main(["data-stats", "--out", str(tmp_path / "o"), "data.dataset=imagenet-lt", f"data.root={tmp_path}",
                 "data.train_list=list.txt", "data.test_list=list.txt"]) == 2
    err = capsys.readouterr().err
    assert "list.txt:1: not UTF-8 text (byte 0xff at column 7)" in err and "Traceback" not in err, err


def test_an_internal_error_keeps_its_traceback_and_exits_1(tmp_path, monkeypatch, capsys):
    """A plain ValueError (or any other exception) from inside fastcbd or torch is a bug, not a user mistake."""
    import fastcbd.data.stats

    def broken(splits):
        raise ValueError("an internal bug")

    monkeypatch.setattr(fastcbd.data.stats, "describe", broken)
    assert main(["data-stats", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "Traceback (most recent call last)" in err, err
    assert 'raise ValueError("an internal bug")' in err and "ValueError: an internal bug" in err, err


def test_worker_errors_keep_their_type_and_message():
    """torch re-raises a worker's exception as type(exc)(text with the worker's traceback); the documented
    types keep only the original message."""
    from torch._utils import ExceptionWrapper

    for cls in (BadInputError, ConfigError, UserError):
        try:
            raise cls("/data/x.jpg: truncated JPEG (data.skip_bad=true skips such items)")
        except cls:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
        with pytest.raises(cls) as info:
            wrapped.reraise()
        assert str(info.value) == "/data/x.jpg: truncated JPEG (data.skip_bad=true skips such items)"


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_in_a_worker_is_a_one_line_user_error(tmp_path, workers):
    """Without data.skip_bad a truncated JPEG stops training with the same one-line error as a bad list
    line, naming the file, with 0 or 2 DataLoader workers."""
    items = write_jpegs(tmp_path, [4, 4], "train")
    write_list(tmp_path / "train.txt", items)
    write_list(tmp_path / "test.txt", items)
    bad = tmp_path / items[2][0]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    proc = subprocess.run(
        [sys.executable, "-m", "fastcbd", "train-teachers", "--out", str(tmp_path / "o"), "data.dataset=imagenet-lt",
         f"data.root={tmp_path}", "data.train_list=train.txt", "data.test_list=test.txt", "data.loader=torch",
         f"data.workers={workers}", "data.image_size=16", "data.batch_size=8", "teacher.kinds=[vanilla]",
         "teacher.optim.epochs=1", "model.width=2", "threads=1", "amp=none", "channels_last=false"],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {bad}: truncated JPEG" in proc.stderr and "(data.skip_bad=true skips such items)" in proc.stderr
    assert "Traceback" not in proc.stderr and "Caught" not in proc.stderr, proc.stderr[-3000:]
