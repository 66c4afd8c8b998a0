"""The streaming converter on real DeepSpeed checkpoints: same bytes as the reference tools, safe output."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from clusterctl.atomic import MARKER
from clusterctl.convert import core
from clusterctl.errors import UserError


def tensors(folder):
    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(f))
    return out


def reference(ckpt, base, dtype, out):
    """What people do today: DeepSpeed's zero_to_fp32, load into the model, save_pretrained."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(ckpt, lazy_mode=False), strict=True)
    model.save_pretrained(out)
    return tensors(out)


@pytest.mark.parametrize("fixture,dtype", [("zero3_ckpt", torch.bfloat16), ("zero2_ckpt", torch.float32),
                                           ("zero3_frozen_ckpt", torch.bfloat16)])
def test_same_tensors_as_save_pretrained(request, base_model, tmp_path, fixture, dtype):
    ckpt = request.getfixturevalue(fixture)
    if fixture == "zero3_frozen_ckpt":           # really saved as frozen fragments, outside the optimizer
        from clusterctl.convert.checkpoint import ZeroCheckpoint
        assert ZeroCheckpoint(os.path.join(ckpt, "global_step2")).params["model.embed_tokens.weight"].per_rank == 0
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    marker = core.convert(ckpt, str(tmp_path / "out"), dtype=name, max_shard_bytes=500_000)
    ours, ref = tensors(tmp_path / "out"), reference(ckpt, base_model, dtype, str(tmp_path / "ref"))
    assert set(ours) == set(ref)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in ours and not any("gate_up_proj" in n for n in ours)
    for n in ref:
        assert ours[n].dtype == ref[n].dtype and torch.equal(ours[n], ref[n]), n
    assert marker["verify"]["logits"] == "match" and marker["verify"]["bytes"] == "equal"
    if name == "fp32":
        assert marker["verify"]["logits_max_abs_diff"] == 0.0


def test_output_folder_is_complete_and_servable_layout(zero3_ckpt, tmp_path):
    out = tmp_path / "model"
    core.convert(zero3_ckpt, str(out), max_shard_bytes=500_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and MARKER in files and not os.path.exists(str(out) + ".partial")
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["topk_method"] == "noaux_tc" and "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    marker = json.loads((out / MARKER).read_text())
    assert set(marker["files"]) == set(shards)


def test_refuses_to_overwrite_complete_output_without_force(zero3_ckpt, tmp_path):
    out = str(tmp_path / "model")
    core.convert(zero3_ckpt, out, verify=False)
    with pytest.raises(UserError, match="already a complete model folder.*\n.*--force"):
        core.convert(zero3_ckpt, out, verify=False)
    before = os.stat(os.path.join(out, MARKER)).st_mtime_ns
    core.convert(zero3_ckpt, out, verify=False, force=True)
    assert os.stat(os.path.join(out, MARKER)).st_mtime_ns != before
    assert not glob.glob(out + ".old-*") and not os.path.exists(out + ".partial")


def test_interrupted_conversion_resumes_keeping_finished_shards(zero3_ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "model")
    real, calls = core.write_shard, []

    def dies_on_third(ck, path, pieces):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(ck, path, pieces)

    monkeypatch.setattr(core, "write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        core.convert(zero3_ckpt, out, verify=False, max_shard_bytes=300_000)
    monkeypatch.setattr(core, "write_shard", real)
    assert not os.path.exists(out) and not glob.glob(out + ".partial/*.tmp")
    done = sorted(glob.glob(out + ".partial/model-*.safetensors"))
    assert len(done) == 2
    inodes = {os.path.basename(p): os.stat(p).st_ino for p in done}
    with open(done[1], "r+b") as f:        # damage one finished shard: it must be rewritten, the other kept
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    core.convert(zero3_ckpt, out, max_shard_bytes=300_000)
    names = sorted(inodes)
    assert os.stat(os.path.join(out, names[0])).st_ino == inodes[names[0]]
    assert os.stat(os.path.join(out, names[1])).st_ino != inodes[names[1]]
    fresh = str(tmp_path / "fresh")
    core.convert(zero3_ckpt, fresh, verify=False, max_shard_bytes=300_000)
    assert json.loads(open(os.path.join(out, MARKER)).read())["files"] == \
        json.loads(open(os.path.join(fresh, MARKER)).read())["files"]


def test_workers_write_identical_files(zero3_ckpt, tmp_path):
    one = core.convert(zero3_ckpt, str(tmp_path / "one"), verify=False, max_shard_bytes=300_000)
    two = core.convert(zero3_ckpt, str(tmp_path / "two"), verify=False, max_shard_bytes=300_000, workers=2)
    assert len(one["files"]) > 2 and one["files"] == two["files"]


def test_picks_newest_complete_tag(ckpt_copy, tmp_path):
    import shutil

    newer = os.path.join(ckpt_copy, "global_step4")
    shutil.copytree(os.path.join(ckpt_copy, "global_step2"), newer)
    os.unlink(os.path.join(newer, MARKER))                 # a save that never finished
    with open(os.path.join(ckpt_copy, "latest"), "w") as f:
        f.write("global_step4")
    marker = core.convert(ckpt_copy, str(tmp_path / "m"), verify=False)
    assert marker["source"].endswith("global_step2")
    with pytest.raises(UserError, match=r"global_step4.*incomplete.*clusterctl-complete.json is missing"):
        core.convert(newer, str(tmp_path / "m2"), verify=False)


def test_refuses_latest_pointing_to_nothing(ckpt_copy, tmp_path):
    with open(os.path.join(ckpt_copy, "latest"), "w") as f:
        f.write("global_step9")
    with pytest.raises(UserError, match=r"'latest' names tag 'global_step9'.*does not exist"):
        core.convert(ckpt_copy, str(tmp_path / "m"), verify=False)


def test_refuses_missing_and_truncated_rank_files(ckpt_copy, tmp_path):
    tag = os.path.join(ckpt_copy, "global_step2")
    optim1 = glob.glob(os.path.join(tag, "*zero_pp_rank_1_mp_rank_00_optim_states.pt"))[0]
    data = open(optim1, "rb").read()
    with open(optim1, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"rank_1_mp_rank_00_optim_states.pt: cannot read checkpoint file"):
        core.convert(ckpt_copy, str(tmp_path / "m"), verify=False)
    os.unlink(optim1)
    with pytest.raises(UserError, match=r"2 ranks is missing files: rank 1: \*zero_pp_rank_1_mp_rank_00_optim"):
        core.convert(ckpt_copy, str(tmp_path / "m"), verify=False)


def test_refuses_output_dir_without_complete_tag(tmp_path):
    (tmp_path / "ck" / "global_step1").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint tag"):
        core.convert(str(tmp_path / "ck"), str(tmp_path / "m"))


def test_refuses_config_of_another_architecture(ckpt_copy, tmp_path):
    cfg_path = os.path.join(ckpt_copy, "hf", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["num_hidden_layers"] = 2
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UserError, match=r"does not match the architecture.*not in the model: model\.layers\.2\."):
        core.convert(ckpt_copy, str(tmp_path / "m"), verify=False)


def test_refuses_when_disk_is_too_small(zero3_ckpt, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        with pytest.raises(UserError, match=r"not enough disk space: the output needs 0\.0\d GiB"):
            core.convert(zero3_ckpt, str(small / "m"), verify=False)
        assert not os.path.exists(small / "m")
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_command_line(zero3_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "clusterctl.convert", "--checkpoint", zero3_ckpt, "--out", str(tmp_path / "m"),
           "--dtype", "fp32", "--workers", "2", "--max-shard-size", "1MB"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert "verify: logits match (max abs diff 0)" in ok.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "pass --force" in again.stderr and "Traceback" not in again.stderr


def test_two_nodes_share_the_shards(zero3_ckpt, tmp_path):
    """Two node processes on one shared folder write identical bytes to a one-node conversion."""
    single = core.convert(zero3_ckpt, str(tmp_path / "single"), verify=False, max_shard_bytes=300_000)
    out = str(tmp_path / "multi")
    procs = [subprocess.Popen([sys.executable, "-m", "clusterctl.convert", "--checkpoint", zero3_ckpt, "--out", out,
                               "--max-shard-size", "300KB", "--nodes", "2", "--node-rank", str(rank),
                               "--wait-timeout", "300"], stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "node 1: 5 shards done" in logs[0] and "verify: logits match" in logs[1]
    multi = json.loads(open(os.path.join(out, MARKER)).read())
    assert multi["files"] == single["files"] and len(single["files"]) == 10


def test_saved_name_map_spares_transformers_and_a_stale_one_is_ignored(ckpt_copy, tmp_path):
    """The SFT stage saves the name map beside config.json; convert then never imports transformers, and
    writes the same bytes as when it builds the map itself (also after config.json changed under the map)."""
    from clusterctl.convert.layout import LAYOUT_FILE

    hf = os.path.join(ckpt_copy, "hf")
    assert os.path.exists(os.path.join(hf, LAYOUT_FILE))     # written by make_checkpoint, as by the SFT stage
    script = ("import sys; from clusterctl.convert.core import convert; "
              "m = convert(sys.argv[1], sys.argv[2], verify=False); "
              "print('transformers imported:', 'transformers' in sys.modules); print(sorted(m['files'].values()))")

    def run(out):
        r = subprocess.run([sys.executable, "-c", script, ckpt_copy, str(tmp_path / out)], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return r

    saved = run("saved")
    assert "transformers imported: False" in saved.stdout and "building the model on meta" not in saved.stderr
    cfg_path = os.path.join(hf, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["note"] = "edited after training"
    json.dump(cfg, open(cfg_path, "w"))
    rebuilt = run("rebuilt")
    assert "transformers imported: True" in rebuilt.stdout and "building the model on meta" in rebuilt.stderr
    assert saved.stdout.splitlines()[1] == rebuilt.stdout.splitlines()[1]    # same shard hashes


def test_strided_pieces_take_the_simple_path(zero3_ckpt):
    """A piece that is not one contiguous run (a transposing conversion) equals the obvious gather + view."""
    from clusterctl.convert.checkpoint import ZeroCheckpoint
    from clusterctl.convert.layout import Piece
    from clusterctl.convert.tensors import extract, reference_extract

    ck = ZeroCheckpoint(os.path.join(zero3_ckpt, "global_step2"))
    name = "model.layers.1.mlp.experts.down_proj"
    rows, cols = ck.shape(name)[-2:]
    transposed = Piece("t", name, rows * cols, (cols, rows), (1, cols), "bfloat16")
    straight = Piece("s", name, rows * cols, (rows, cols), (cols, 1), "bfloat16")
    assert not transposed.contiguous and straight.contiguous
    for p in (transposed, straight):
        assert torch.equal(extract(ck, p), reference_extract(ck, p))
    assert torch.equal(extract(ck, transposed), extract(ck, straight).t())
