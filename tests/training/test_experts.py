"""Routed experts in groups (training/experts.py) and the chunked loss give today's loss and gradients, under
ZeRO-3 on 2 gloo ranks; a grouped checkpoint converts to the same standard per-expert folder."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.ports import free_port

from clusterctl.errors import UserError
from clusterctl.training import experts

HERE = Path(__file__).parent


def fold(grads: dict) -> dict:
    """Grouped gradients (`experts.group<g>.P`) concatenated back into the fused `experts.P` rows."""
    out: dict = {}
    for name, grad in grads.items():
        if ".experts.group" in name:
            head, rest = name.split(".experts.group")
            group, param = rest.split(".", 1)
            out.setdefault(f"{head}.experts.{param}", {})[int(group)] = grad
        else:
            out[name] = grad
    return {n: torch.cat([g[i] for i in sorted(g)]) if isinstance(g, dict) else g for n, g in out.items()}


@pytest.fixture(scope="module")
def zero3(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "results.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(HERE / "experts_zero3.py"), str(tiny_model), str(out), "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=HERE,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-5000:]
    return out.parent, torch.load(out)


@pytest.mark.parametrize("layout", ["grouped", "chunked", "grouped+chunked"])
def test_same_loss_and_gradients_under_zero3(zero3, layout):
    _, results = zero3
    reference_loss, reference, *_ = results["fused"]
    value, grads, *_ = results[layout]
    torch.testing.assert_close(value, reference_loss, rtol=1e-6, atol=1e-4)
    grads = fold(grads)
    assert grads.keys() == reference.keys() and "model.layers.1.mlp.experts.gate_up_proj" in grads
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_backward_keeps_no_view_of_a_released_group(zero3):
    """The fused experts' forward saves views of its 3-D weights (each keeps the whole gathered tensor alive
    after ZeRO-3 releases it: every group of a layer gathered at once in the backward); the groups save none."""
    _, results = zero3
    assert results["fused"][3] > 0
    assert results["grouped"][3] == results["grouped+chunked"][3] == 0


def test_no_rank_assembles_more_than_one_group(zero3):
    """Regrouping under ZeRO-3 all-reduces one group's elements at a time, never a layer's fused tensor."""
    _, results = zero3
    layer = 4 * 2 * 64 * 128                          # the tiny model's gate_up_proj: E x 2I x H
    assert results["grouped"][2] == layer // 2


def test_grouped_checkpoint_converts_to_the_same_per_expert_folder(zero3, tmp_path):
    from safetensors.torch import load_file

    from clusterctl.convert.core import convert

    folder, _ = zero3
    written = {}
    for layout in ("fused", "grouped"):
        convert(str(folder / layout), str(tmp_path / layout), dtype="fp32", verify=True)
        index = json.loads((tmp_path / layout / "model.safetensors.index.json").read_text())["weight_map"] \
            if (tmp_path / layout / "model.safetensors.index.json").exists() else None
        files = sorted(set(index.values())) if index else ["model.safetensors"]
        written[layout] = {k: v for f in files for k, v in load_file(tmp_path / layout / f).items()}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in written["fused"]
    assert written["grouped"].keys() == written["fused"].keys()
    for name, tensor in written["fused"].items():
        assert torch.equal(written["grouped"][name], tensor), name


def model(tiny_model, groups: int):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    experts.regroup(loaded, groups)
    return loaded


def test_groups_of_one_expert_equal_the_fused_module_without_zero(tiny_model):
    fused, grouped = model(tiny_model, 1), model(tiny_model, 4)
    assert [n for n, _ in grouped.named_parameters() if ".experts." in n][:2] == [
        "model.layers.1.mlp.experts.groups.0.gate_up_proj", "model.layers.1.mlp.experts.groups.0.down_proj"]
    ids = torch.randint(0, 600, (2, 19), generator=torch.Generator().manual_seed(1))
    values = []
    for m in (fused, grouped):
        value = m(input_ids=ids, labels=ids).loss
        value.backward()
        values.append((value.detach(), fold({n.replace(".groups.", ".group"): p.grad for n, p in m.named_parameters()})))
    torch.testing.assert_close(values[1][0], values[0][0])
    for name, grad in values[0][1].items():
        torch.testing.assert_close(values[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_group_count_defaults_to_a_bound_and_must_divide(tiny_model):
    r1 = {"n_routed_experts": 256, "hidden_size": 7168, "moe_intermediate_size": 2048}
    assert experts.groups_for(r1) == 16                               # 16 experts, 0.70 B parameters a group
    assert 256 // 8 * 3 * 7168 * 2048 > experts.GROUP_PARAMS          # 8 groups would exceed the bound
    assert experts.groups_for(r1, 4) == 4 and experts.groups_for({"hidden_size": 64}) == 1
    assert experts.groups_for({"n_routed_experts": 4, "hidden_size": 128, "moe_intermediate_size": 64}) == 1
    with pytest.raises(UserError, match="expert_groups 3 does not divide the 4 routed experts"):
        model(tiny_model, 3)


def test_lora_on_grouped_experts_trains_resumes_and_merges_into_per_expert_names(tiny_model, tmp_path):
    """LoRA on the grouped routed experts (peft target_parameters per group): the merged per-expert
    tensors equal peft's own merge_and_unload on the model as trained (regrouped)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from sft_run import run_sft, write_config
    from transformers import AutoModelForCausalLM

    from clusterctl.convert.merge import lora_checkpoint, regroup_as_trained
    from clusterctl.training.lora import exact_targets

    values = dict(model=str(tiny_model), grad_accum=1, save_steps=1, lr=1e-2, expert_groups=2, method="lora",
                  lora={"rank": 4, "alpha": 8, "targets": ["routed_experts"]})
    run_sft(write_config(tmp_path / "sft", max_steps=1, **values))
    resumed = run_sft(write_config(tmp_path / "sft", max_steps=2, **values))
    assert "resumed from" in resumed.stdout and "at step 1" in resumed.stdout
    checkpoint = tmp_path / "sft" / "checkpoints"
    subprocess.run([sys.executable, "-m", "clusterctl.convert", "--checkpoint", str(checkpoint), "--out",
                    str(tmp_path / "model")], check=True, timeout=600)
    ours = {k: v for f in sorted((tmp_path / "model").glob("*.safetensors")) for k, v in load_file(f).items()}
    _, _, adapter = lora_checkpoint(str(checkpoint))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    regroup_as_trained(base, adapter)
    with exact_targets():
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    before, inter, changed = load_file(tiny_model / "model.safetensors"), 64, 0
    for layer in (1, 2):
        for expert in range(4):
            prefix, (group, local) = f"model.layers.{layer}.mlp.experts", divmod(expert, 2)
            gate_up = merged[f"{prefix}.groups.{group}.gate_up_proj"][local]
            want = {"gate_proj": gate_up[:inter], "up_proj": gate_up[inter:],
                    "down_proj": merged[f"{prefix}.groups.{group}.down_proj"][local]}
            for name, tensor in want.items():
                got = ours[f"{prefix}.{expert}.{name}.weight"].float()
                torch.testing.assert_close(got, tensor.to(got.dtype), rtol=1e-2, atol=1e-3)
                changed += not torch.equal(got, before[f"{prefix}.{expert}.{name}.weight"].float())
    assert changed >= 12                                   # the adapters moved the routed experts
