"""Real (CPU) GGUF exports: f32 GGUFs of the tiny Llama and the tiny DeepSeek-V3 whose greedy tokens under
llama.cpp's server equal transformers', and a q4_k_m file (f16, then llama-quantize) that llama.cpp loads."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gguf.conftest import PROMPTS, converted_run, greedy_reference, llama_server, served_greedy


def gguf_file_type(toolchain, path: Path) -> int:
    """general.file_type of a GGUF, read by llama.cpp's own gguf-py in a fresh interpreter."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gguf import GGUFReader; "
            "f = GGUFReader(sys.argv[2]).fields['general.file_type']; print(int(f.parts[f.data[0]][0]))")
    return int(subprocess.run([sys.executable, "-c", code, str(toolchain.converter / "gguf-py"), str(path)],
                              capture_output=True, text=True, check=True).stdout)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_model"])
def test_f32_gguf_gives_transformers_greedy_tokens(request, toolchain, clusterctl, tmp_path, which):
    run = converted_run(clusterctl, tmp_path, request.getfixturevalue(which))
    model = tmp_path / "converted"
    done = clusterctl("export", "gguf", run.id, "--type", "f32", "--json")
    result = json.loads(done.stdout)
    gguf = run.dir / "export" / f"{run.id}-f32.gguf"
    assert result["gguf"] == str(gguf) and result["type"] == "f32" and gguf.stat().st_size == result["bytes"]
    assert f"converting {model} -> {gguf.name} (f32)" in done.stderr
    assert sorted(p.name for p in gguf.parent.iterdir()) == sorted([gguf.name, f"{run.id}-f32.Modelfile"])
    assert gguf_file_type(toolchain, gguf) == 0            # LLAMA_FTYPE_ALL_F32
    compared = 0
    with llama_server(toolchain, gguf, tmp_path / "server.log") as url:
        for ids in PROMPTS:
            want = greedy_reference(model, ids, 12)
            got = served_greedy(url, ids, 12)
            assert got[:len(want)] == want, (ids, got, want)
            compared += len(want)
    assert compared >= 12, compared


@pytest.mark.slow
def test_q4_k_m_is_quantised_from_f16_and_loads(toolchain, clusterctl, tmp_path, tiny_llama):
    from safetensors import safe_open

    run = converted_run(clusterctl, tmp_path, tiny_llama)
    out = tmp_path / "out" / "tiny-q4_k_m.gguf"
    done = clusterctl("export", "gguf", run.id, "--type", "q4_k_m", "--out", out)
    assert "converting" in done.stderr and "(f16)" in done.stderr, done.stderr
    assert "quantising f16 -> q4_k_m (llama-quantize)" in done.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-q4_k_m.Modelfile", "tiny-q4_k_m.gguf"]  # no temporaries
    with safe_open(tmp_path / "converted" / "model.safetensors", "pt") as weights:
        f16_bytes = 2 * sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    assert out.stat().st_size < 0.6 * f16_bytes, (out.stat().st_size, f16_bytes)
    assert gguf_file_type(toolchain, out) == 15          # LLAMA_FTYPE_MOSTLY_Q4_K_M
    with llama_server(toolchain, out, tmp_path / "server.log") as url:
        assert len(served_greedy(url, PROMPTS[0], 4)) == 4
