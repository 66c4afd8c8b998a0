"""Markers: only complete folders count; latest follows the marker; pruning never leaves a fake."""
from clusterctl.training import checkpoint as ckpt


def make(out, step, complete=True):
    folder = out / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.publish(out, folder.name, {"step": step})
    return folder


def test_incomplete_folders_are_ignored_and_pruned(tmp_path):
    for step in (2, 4, 6):
        make(tmp_path, step)
    make(tmp_path, 5, complete=False)
    make(tmp_path, 8, complete=False)                    # a save interrupted mid-way
    assert ckpt.complete_tags(tmp_path) == ["step-2", "step-4", "step-6"]
    assert ckpt.latest_complete(tmp_path) == "step-6" and (tmp_path / "latest").read_text() == "step-6"
    removed = ckpt.prune(tmp_path, keep=2)
    assert sorted(removed) == ["step-2", "step-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-4", "step-6", "step-8"]


def test_hf_metadata_copies_everything_but_weights(tmp_path, tiny_model):
    out = ckpt.write_hf_metadata(tiny_model, tmp_path)
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "tokenizer.json" in names and "generation_config.json" in names
    assert not [n for n in names if n.endswith(".safetensors") or n == ckpt.MARKER]
