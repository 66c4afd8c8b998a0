"""Swap provisioning for real (root, 64 MiB files): created only for a deficit, removed however the job ends."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from clusterctl.convert import swap
from clusterctl.errors import UserError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="swapon needs root")


@pytest.fixture
def swap_file(tmp_path):
    path = str(tmp_path / "swap" / "clusterctl.swap")
    os.makedirs(os.path.dirname(path))
    yield path
    subprocess.run(["swapoff", path], capture_output=True)
    if os.path.exists(path):
        os.unlink(path)


@pytest.fixture
def tmpfs(tmp_path):
    """A small filesystem: mount points are torn down even when the test fails."""
    mounts = []

    def make(size):
        d = tmp_path / f"fs{len(mounts)}"
        d.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)]).returncode:
            pytest.skip("cannot mount tmpfs here")
        mounts.append(d)
        return d
    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)])


def listed(path):
    return os.path.realpath(path) in open("/proc/swaps").read()


def test_creates_exactly_the_deficit_and_removes_it(swap_file):
    size = swap.up(swap_file, 40 << 20)
    try:
        assert size == 64 << 20 and os.path.getsize(swap_file) == size
        assert os.stat(swap_file).st_mode & 0o777 == 0o600 and listed(swap_file)
    finally:
        swap.down(swap_file)
    assert not listed(swap_file) and not os.path.exists(swap_file)
    swap.down(swap_file)                       # idempotent: the trap may run after a manual clean-up


def test_command_line_makes_no_swap_when_memory_suffices(swap_file):
    r = subprocess.run([sys.executable, "-m", "clusterctl.convert.swap", "up", "--file", swap_file, "--need", "1MB"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "no swap needed" in r.stderr and not os.path.exists(swap_file)


def test_refuses_when_the_folder_lacks_space(tmpfs):
    small = tmpfs("8M")
    with pytest.raises(UserError, match=r"needs a 0\.06 GiB swap file, the folder has 0\.01 GiB free"):
        swap.up(str(small / "s.swap"), 10 << 20)
    assert not os.listdir(small)


def test_refuses_when_swapon_is_not_permitted(tmpfs):
    fs = tmpfs("80M")                          # the kernel refuses swap files on tmpfs, like many containers
    with pytest.raises(UserError, match=r"swapon refused the file .*\n  fix: run the convert job as root"):
        swap.up(str(fs / "s.swap"), 10 << 20)
    assert not os.listdir(fs)


def test_xtuner_needs_the_whole_model(zero3_ckpt):
    tag = os.path.join(zero3_ckpt, "global_step2")
    optim = sum(os.path.getsize(os.path.join(tag, f)) for f in os.listdir(tag) if f.endswith("optim_states.pt"))
    assert swap.need_bytes(tag, "xtuner", "bf16", 1) == swap.BASE_PER_PROCESS + optim // 3
    ours = swap.need_bytes(zero3_ckpt, "clusterctl", "bf16", 2)
    assert 2 * swap.BASE_PER_PROCESS < ours < 2 * swap.BASE_PER_PROCESS + (8 << 20)


def render_convert(tmp_path, checkpoint, swap_dir, need):
    from clusterctl.backends.base import backend_for
    from clusterctl.config import load_cluster, load_job
    from clusterctl.render import render_run, write_files
    from clusterctl.run import Run

    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({
        "swap_dir": str(swap_dir), "python": sys.executable, "env": {"CLUSTERCTL_SWAP_NEED": str(need)}}))
    cluster = load_cluster(str(tmp_path / "cluster.yaml"))
    job = load_job(None, sft_nodes=None, cluster=cluster)
    run = Run(tmp_path / "runs" / "20260101-000000-swap")
    write_files(run, render_run(run, ["convert"], cluster=cluster, job=job, backend=backend_for(cluster),
                                master_port=15000, overrides={"checkpoint": checkpoint}))
    return run


@pytest.mark.parametrize("ending", ["completes", "killed"])
def test_node_script_removes_its_swap_however_it_ends(zero3_ckpt, tmp_path, ending):
    swap_dir = tmp_path / "swapdir"
    swap_dir.mkdir()
    # 1 GiB above what is free now: other processes freeing memory before the node script measures must not
    # make the swap unneeded (32 MiB did, on a busy machine)
    run = render_convert(tmp_path, zero3_ckpt, swap_dir, swap.available_bytes() + (1 << 30))
    proc = subprocess.Popen(["bash", str(run.node_script("convert", 0))], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    swap_path = swap_dir / "clusterctl-swap-20260101-000000-swap-node-000"
    try:
        deadline = time.time() + 120
        while not listed(swap_path) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert listed(swap_path), proc.stdout.read() if proc.poll() is not None else "no swap after 120 s"
        if ending == "killed":
            os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
        if ending == "completes":
            assert proc.returncode == 0, out
            assert (run.stage_dir("convert") / "model" / "clusterctl-complete.json").exists()
        else:
            assert proc.returncode != 0
        assert not listed(swap_path) and not swap_path.exists(), out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["swapoff", str(swap_path)], capture_output=True)
        if swap_path.exists():
            swap_path.unlink()
