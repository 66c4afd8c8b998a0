"""One rule for "the newest complete checkpoint", shared by training (resume) and convert (what to convert
when `latest` names nothing usable): the complete tag with the highest step, never the newest mtime."""
import os

import pytest

from clusterctl.atomic import MARKER, latest_complete, write_marker
from clusterctl.convert.checkpoint import resolve
from clusterctl.errors import UserError


def tag(out, name, complete=True, mtime=None):
    folder = out / name
    folder.mkdir(parents=True)
    if complete:
        write_marker(folder, {"tag": name})
        if mtime is not None:
            os.utime(folder / MARKER, (mtime, mtime))
    return folder


@pytest.mark.parametrize("names", [["step-2", "step-10"], ["global_step9", "global_step10"]])
def test_convert_and_training_pick_the_highest_step_not_the_newest_mtime(tmp_path, names):
    older, newer = names
    tag(tmp_path, newer, mtime=1_000_000)                # saved first... by its marker's clock
    tag(tmp_path, older, mtime=2_000_000)                # a copy or a touch makes it look newer
    tag(tmp_path, newer.replace("10", "11"), complete=False)   # an interrupted save never counts
    assert latest_complete(tmp_path) == newer
    assert resolve(str(tmp_path))[0] == str(tmp_path / newer)


def test_latest_names_the_tag_when_complete(tmp_path):
    tag(tmp_path, "step-2")
    tag(tmp_path, "step-4")
    (tmp_path / "latest").write_text("step-2")           # select: best points it at an older, better tag
    assert resolve(str(tmp_path))[0] == str(tmp_path / "step-2")


def test_no_complete_tag_is_refused(tmp_path):
    tag(tmp_path, "step-3", complete=False)
    tag(tmp_path, "hf")                                  # complete, but no step: not a checkpoint
    with pytest.raises(UserError, match="no complete checkpoint tag"):
        resolve(str(tmp_path))


@pytest.mark.parametrize("content", [b"step-9", b"\xff\xfe", b"", b"../step-2", b".."])
def test_latest_naming_no_tag_folder_of_its_own_is_refused(tmp_path, content):
    tag(tmp_path / "ck", "step-2")
    (tmp_path / "ck" / "latest").write_bytes(content)
    with pytest.raises(UserError, match=r"latest: 'latest' names tag .*, which does not exist as a folder of "):
        resolve(str(tmp_path / "ck"))
