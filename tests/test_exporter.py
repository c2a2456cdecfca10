"""StructureExporter: counts, file format, atomic writes, prefixes, and reading files back."""

import json
import os
import stat

import pytest
import torch
from torch import nn

import morphnet
from morphnet.export import atomic_write, load_alive_counts
from nets import ConcatNet


def _reg(net=None):
    return morphnet.GammaFlopsRegularizer(net or ConcatNet(), torch.randn(1, 3, 17, 19), gamma_threshold=0.45)


def test_file_is_flat_sorted_indented_json_at_the_step_path(tmp_path):
    path = morphnet.StructureExporter(_reg()).create_file_and_save_alive_counts(tmp_path, 9000)
    assert path == tmp_path / "learned_structure" / "alive_9000.json"
    text = path.read_text()
    assert json.loads(text) == {"conv1": 7, "conv2": 11, "conv3": 10, "conv4": 17}
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    assert load_alive_counts(path) == json.loads(text)


def test_zero_counts_are_exported():
    net = ConcatNet()
    with torch.no_grad():
        net.bn2.weight.zero_()
    assert morphnet.StructureExporter(_reg(net)).get_alive_counts()["conv2"] == 0


def test_remove_common_prefix():
    wrapped = nn.Sequential()
    wrapped.add_module("backbone", ConcatNet())
    exporter = morphnet.StructureExporter(_reg(wrapped), remove_common_prefix=True)
    assert exporter.get_alive_counts() == {"conv1": 7, "conv2": 11, "conv3": 10, "conv4": 17}
    assert "backbone.conv1" in morphnet.StructureExporter(_reg(wrapped)).get_alive_counts()


def test_loading_bad_files_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_alive_counts(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_alive_counts(bad)
    bad.write_text('{"conv1": "seven"}')
    with pytest.raises(ValueError, match="conv1"):
        load_alive_counts(bad)


def test_a_write_interrupted_before_the_rename_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C (or any failure) between writing the new file and renaming it into place: the structure
    file read afterwards is the previous one, whole, and no temporary file is left beside it."""
    net = ConcatNet()
    exporter = morphnet.StructureExporter(_reg(net))
    path = exporter.create_file_and_save_alive_counts(tmp_path, 7)
    before = path.read_bytes()
    with torch.no_grad():
        net.bn1.weight.zero_()  # the next export holds other counts
    assert exporter.get_alive_counts() != json.loads(before)

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        exporter.create_file_and_save_alive_counts(tmp_path, 7)
    assert path.read_bytes() == before and os.listdir(path.parent) == [path.name]
    monkeypatch.undo()  # the next export goes through
    assert json.loads(exporter.create_file_and_save_alive_counts(tmp_path, 7).read_text())["conv1"] == 0


def test_a_write_that_fails_half_way_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "state.json", lambda handle: handle.write('{"step": 1}\n'))

    def half_then_disk_full(handle):
        handle.write('{"st')
        handle.flush()
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_disk_full)
    assert path.read_text() == '{"step": 1}\n' and os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_are_created_with_the_users_umask(tmp_path, umask):
    """Structure files, slim models and run checkpoints get 0666 less the umask, as ``open`` would
    give them (``tempfile.mkstemp`` made every file 0600, unreadable by the user's group)."""
    from morphnet.pipeline import files

    previous = os.umask(umask)
    try:
        written = [
            morphnet.StructureExporter(_reg()).create_file_and_save_alive_counts(tmp_path, 1),
            files.save_checkpoint(tmp_path / "checkpoints" / "learn.pt", {"step": 1}),
            files.write_text(tmp_path / "report.html", "<html></html>"),
        ]
        slim = morphnet.save_slim(tmp_path / "slim", nn.Linear(2, 2), {"x": 2})
        written += [slim / "structure.json", slim / "state_dict.pt"]
        # rewriting an existing file keeps the umask's mode too
        written.append(morphnet.StructureExporter(_reg()).create_file_and_save_alive_counts(tmp_path, 1))
    finally:
        os.umask(previous)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert not list(tmp_path.rglob("*.tmp"))
