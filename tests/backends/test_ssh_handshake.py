"""A host that accepts the TCP connection but never speaks SSH (a banner timeout): doctor says so in one
line with a fix about sshd and the port, not paramiko's traceback and not an authentication fix."""
import socket
import subprocess
import sys
import threading

from fixtures.runs import write_cluster


def test_a_banner_timeout_is_one_line_about_sshd(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)                          # the server stops itself if the test dies midway
    port = listener.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(listener.accept()[0])    # held open, silent
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yaml = write_cluster(tmp_path / "cluster.yaml", {
        "backend": "ssh", "hosts": ["127.0.0.1"], "runs_dir": str(tmp_path / "runs"),
        "ssh": {"port": port, "connect_timeout": 1, "known_hosts": str(tmp_path / "known_hosts")}})
    try:
        result = subprocess.run([sys.executable, "-m", "clusterctl.cli", "doctor", "--cluster", yaml],
                                capture_output=True, text=True, timeout=60)
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
        thread.join()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Exception (client)" not in result.stderr, result.stderr
    assert "ssh failed: " in result.stderr and "(no SSH banner within ssh.connect_timeout)" in result.stderr
    assert f"fix: check that sshd answers on port {port}" in result.stderr
    assert "identity_file" not in result.stderr
