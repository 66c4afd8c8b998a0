"""The ssh backend: plain machines reached over SSH (paramiko), driven by the supervisor.

Every host is connected and its host key checked before any node starts, so one unreachable or
unknown host fails the stage with nothing running. Each node runs `bash <stage>/node-NNN.sh`; the
script records its process group in state/<stage>/node-NNN.pid, which is how `cancel` (from any
shell) stops it on its host. Output is streamed line by line into logs/<stage>/node-NNN.log.
The same launch by hand: <stage>/pdsh.sh."""
from __future__ import annotations

import getpass
import logging
import os
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from clusterctl.backends.base import NodeProcess, SupervisedBackend, parse_probes
from clusterctl.errors import UserError
from clusterctl.procs import Identity
from clusterctl.render import render_template
from clusterctl.run import Run, StageState, recorded_exit

# paramiko logs a failed handshake with its traceback from the transport thread; connect() says it in one line
logging.getLogger("paramiko").addHandler(logging.NullHandler())

STOP_GRACE_S = 10
PID_FILE_WAIT_S = 3


@dataclass
class Target:
    """Where one host of cluster.yaml really is, after ~/.ssh/config-style alias resolution."""
    alias: str
    hostname: str
    port: int
    user: str
    key_files: list[str]


class SshConnector:
    """Connections to the hosts of cluster.yaml (its `ssh:` settings), host keys checked."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.ssh = cluster.ssh
        self.known_hosts = os.path.expanduser(self.ssh.known_hosts)
        self.config = None
        if self.ssh.ssh_config:
            import paramiko
            self.config = paramiko.SSHConfig.from_path(os.path.expanduser(self.ssh.ssh_config))

    def target(self, host: str) -> Target:
        found = self.config.lookup(host) if self.config else {}
        keys = [os.path.expanduser(self.ssh.identity_file)] if self.ssh.identity_file else []
        keys += [os.path.expanduser(k) for k in found.get("identityfile", []) if not self.ssh.identity_file]
        return Target(alias=host, hostname=found.get("hostname", host),
                      port=int(found.get("port", self.ssh.port)),
                      user=self.ssh.user or found.get("user") or getpass.getuser(), key_files=keys)

    def connect(self, host: str):
        """A connected paramiko client; every failure is a UserError naming the host and the fix."""
        import paramiko

        target = self.target(host)
        client = paramiko.SSHClient()
        if os.path.exists(self.known_hosts):
            client.load_host_keys(self.known_hosts)
        client.set_missing_host_key_policy(paramiko.WarningPolicy() if self.ssh.insecure_accept_unknown_hosts
                                           else paramiko.RejectPolicy())
        where = f"{self.cluster.source}: hosts"
        timeout = self.ssh.connect_timeout
        try:
            client.connect(target.hostname, port=target.port, username=target.user,
                           key_filename=target.key_files or None, look_for_keys=not target.key_files,
                           allow_agent=not target.key_files, timeout=timeout, banner_timeout=timeout,
                           auth_timeout=timeout)
        except paramiko.BadHostKeyException:
            client.close()
            raise UserError(f"{host}: the host key does not match the one in {self.known_hosts} "
                            "(a reinstalled host, or someone in between)", where=where,
                            fix=f"verify the host, then `ssh-keygen -R {target.hostname} -f {self.known_hosts}` "
                                "and add the new key") from None
        except paramiko.SSHException as exc:
            cause = getattr(client.get_transport(), "saved_exception", None) or exc   # why the handshake died
            client.close()
            if "not found in known_hosts" in str(exc):
                raise UserError(f"{host}: unknown host key (not in {self.known_hosts})", where=where,
                                fix=f"check the fingerprint, then `ssh-keyscan -p {target.port} {target.hostname}"
                                    f" >> {self.known_hosts}`; or set ssh.insecure_accept_unknown_hosts: "
                                    "true in cluster.yaml (trusts any key)") from None
            if isinstance(exc, paramiko.AuthenticationException):
                raise UserError(f"{host}: ssh authentication failed: {exc}", where=where,
                                fix="check ssh.user/identity_file and that `ssh HOST true` works") from None
            # paramiko reports a server that never sent its banner either way, depending on which thread lost
            no_banner = any(text in str(cause) for text in ("banner", "No existing session"))
            silent = " (no SSH banner within ssh.connect_timeout)" if no_banner else ""
            raise UserError(f"{host} ({target.hostname}:{target.port}): ssh failed: {cause}{silent}", where=where,
                            fix=f"check that sshd answers on port {target.port} (`ssh -p {target.port} "
                                f"{target.hostname} true`); if it is only slow, raise ssh.connect_timeout") from None
        except OSError as exc:   # socket.timeout is a TimeoutError, an OSError
            client.close()
            raise UserError(f"{host} ({target.hostname}:{target.port}) cannot be reached: {exc}", where=where,
                            fix="check the host is up, the name resolves and sshd listens on ssh.port") from None
        return client

    def connect_all(self, hosts: list[str]) -> dict:
        """Connect to every host in parallel; if any fails, close all and report every failure."""
        unique = list(dict.fromkeys(hosts))
        results: dict = {}

        def attempt(host):
            try:
                results[host] = self.connect(host)
            except UserError as exc:
                results[host] = exc

        with ThreadPoolExecutor(max_workers=max(1, min(32, len(unique)))) as pool:
            list(pool.map(attempt, unique))
        failures = [r for r in results.values() if isinstance(r, UserError)]
        if failures:
            for result in results.values():
                if not isinstance(result, UserError):
                    result.close()
            raise UserError(f"{len(failures)} of {len(unique)} hosts failed the ssh check; nothing was started:\n"
                            + "\n".join(f"  {f}" for f in failures))
        return results


def run_remote(client, command: str, timeout: float = 60) -> tuple[int, str]:
    """Run one short command; (exit status, combined output); 124 (as timeout(1)) when it hangs."""
    channel = client.get_transport().open_session()
    channel.set_combine_stderr(True)
    channel.settimeout(timeout)
    channel.exec_command(command)
    output = b""
    try:
        while chunk := channel.recv(65536):
            output += chunk
    except TimeoutError:
        channel.close()
        return 124, output.decode(errors="replace") + f"\n(no answer for {timeout:g} s)"
    return channel.recv_exit_status(), output.decode(errors="replace")


class SshNode(NodeProcess):
    """One node script over one SSH channel; a thread copies its output into the node's log."""

    def __init__(self, client, run: Run, stage: str, rank: int, host: str):
        self.run, self.stage, self.rank, self.host = run, stage, rank, host
        self.status: int | None = None
        log_path = run.log_path(stage, rank)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "ab")   # noqa: SIM115 -- closed by the thread that copies the output
        self.channel = client.get_transport().open_session()
        self.channel.set_combine_stderr(True)
        script = run.node_script(stage, rank)
        self.channel.exec_command(f"cd {shlex.quote(str(run.dir))} && exec bash {shlex.quote(str(script))}")
        self.thread = threading.Thread(target=self._copy_output, name=f"ssh-{host}", daemon=True)
        self.thread.start()

    def _copy_output(self) -> None:
        prefix, pending = f"{self.host}: ".encode(), b""
        try:
            while True:
                chunk = self.channel.recv(65536)
                if not chunk:
                    break
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                self.log.write(b"".join(prefix + line + b"\n" for line in lines))
                self.log.flush()
            if pending:
                self.log.write(prefix + pending + b"\n")
            code = self.channel.recv_exit_status()
        except OSError:
            code = -1
        finally:
            self.log.close()
        # -1: killed by a signal (sshd sends exit-signal) or the connection was lost: the script's own
        # exit marker knows better when it got to write one.
        if code < 0:
            recorded = recorded_exit(self.run.node_marker(self.stage, self.rank, "exit"))
            code = 255 if recorded is None else recorded
        self.status = code

    def poll(self) -> int | None:
        return self.status


def stop_group_command(group: Identity, grace: float) -> str:
    """TERM a process group, KILL it if it outlives the grace period; only if its leader is still the
    process the node script recorded (same boot, same start time): exit 3 with a line when it is not."""
    pgid = int(group.pid)
    target = shlex.quote(f"-{pgid}")
    steps = int(grace / 0.2)
    return (f"[ \"$(cat /proc/sys/kernel/random/boot_id)\" = {shlex.quote(group.boot_id)} ] || exit 0; "
            f"[ -r /proc/{pgid}/stat ] || exit 0; "
            f"set -- $(sed 's/.*) //' /proc/{pgid}/stat); "
            f"[ \"${{20}}\" = {int(group.start_ticks)} ] || {{ echo \"started at tick ${{20}}\"; exit 3; }}; "
            f"kill -TERM -- {target} 2>/dev/null || exit 0; "
            f"for i in $(seq {steps}); do kill -0 -- {target} 2>/dev/null || exit 0; sleep 0.2; done; "
            f"kill -KILL -- {target} 2>/dev/null; exit 0")


def pdsh_command(stage_dir: str) -> str:
    """pdsh's remote command: %n (the host's position in -w) picks the node script; %% is a literal %."""
    return f"bash {shlex.quote(stage_dir).replace('%', '%%')}/node-$(printf %%03d %n).sh"


class SshBackend(SupervisedBackend):
    name = "ssh"

    def __init__(self, cluster):
        super().__init__(cluster)
        self.settings = SshConnector(cluster)
        self.clients: dict = {}
        self.max_restarts = cluster.ssh.max_restarts

    def hosts(self, nodes: int) -> list[str | None]:
        return list(self.cluster.hosts[:nodes])

    def master_addr(self, hosts) -> str:
        """The rank-0 host's real name (an ssh alias does not resolve on the nodes)."""
        return self.settings.target(hosts[0]).hostname

    def render_extras(self, run: Run, stage: str, context: dict, *, header) -> dict[str, str]:
        hosts = context["stage"]["hosts"]
        script = run.stage_dir(stage) / "pdsh.sh"
        ssh = self.cluster.ssh
        ssh_args = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                    "-o", f"UserKnownHostsFile={os.path.expanduser(ssh.known_hosts)}", "-p", str(ssh.port)]
        if ssh.identity_file:
            ssh_args += ["-i", os.path.expanduser(ssh.identity_file)]
        if ssh.ssh_config:
            ssh_args += ["-F", os.path.expanduser(ssh.ssh_config)]
        text = render_template(
            "ssh/pdsh.sh.j2", **context,
            header=header(f"run {run.id}, stage {stage} on {len(hosts)} host(s) (ssh backend)", f"bash {script}"),
            pdsh_hosts=",".join(hosts), pdsh_user=ssh.user, ssh_args=" ".join(shlex.quote(a) for a in ssh_args),
            remote_command=pdsh_command(str(run.stage_dir(stage))))
        return {"pdsh.sh": text}

    def submit(self, run: Run, stages: list[str]) -> None:
        """Check the first stage's hosts here, so a bad host is reported in the terminal at once
        (the supervisor checks every stage's hosts again right before starting it)."""
        first = stages[0]
        try:
            for client in self.settings.connect_all(run.read()["stages"][first]["hosts"]).values():
                client.close()
        except UserError as exc:
            run.apply({stage: {"state": StageState.FAILED, "reason": str(exc)} if stage == first else
                       {"state": StageState.CANCELLED, "reason": f"{first} failed"} for stage in stages})
            raise
        super().submit(run, stages)

    def probe(self, argv: list[str], *, nodes: int | None, wait_s: int) -> list[dict]:
        """Connect every host (the first `nodes`, default all; host keys checked); one row per host,
        unreachable ones included."""
        command = " ".join(shlex.quote(a) for a in argv)

        def one(host: str) -> dict:
            try:
                client = self.settings.connect(host)
            except UserError as exc:
                return {"target": host, "error": str(exc)}
            try:
                code, output = run_remote(client, command, timeout=120)
            finally:
                client.close()
            found = parse_probes(output)
            return {"target": host, **found[0]} if found else \
                {"target": host, "error": f"probe exited {code}: {output.strip()[-300:]}"}

        hosts = self.cluster.hosts[:nodes] if nodes else self.cluster.hosts
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(hosts)))) as pool:
            return list(pool.map(one, hosts))

    def check_stage(self, run: Run, stage: str, hosts: list) -> None:
        for client in self.clients.values():
            client.close()
        self.clients = self.settings.connect_all(hosts)

    def start_node(self, run: Run, stage: str, rank: int, host) -> SshNode:
        client = self.clients.get(host) or self.settings.connect(host)
        self.clients[host] = client
        return SshNode(client, run, stage, rank, host)

    def kill_node(self, run: Run, stage: str, rank: int, host, grace: float = STOP_GRACE_S) -> str:
        """Stop the node's process group on its host (read from its pid file; any shell can do this),
        only if the group's leader is still the process the node script recorded."""
        pid_file, exit_file = run.node_marker(stage, rank, "pid"), run.node_marker(stage, rank, "exit")
        deadline = time.monotonic() + PID_FILE_WAIT_S   # a node started a moment ago may not have written it
        while not pid_file.exists() and not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if exit_file.exists() or not pid_file.exists():
            return ""  # finished already, or never started
        group = Identity.from_pid_file(pid_file.read_text())
        if group is None:
            return f"{pid_file} does not say which process it is (pgid, host, boot id, start time): not signalled"
        client = self.clients.get(host)
        if client is None or not client.get_transport() or not client.get_transport().is_active():
            client = self.clients[host] = self.settings.connect(host)
        code, output = run_remote(client, stop_group_command(group, grace), timeout=grace + 30)
        if code == 3:
            return f"{pid_file}: process group {group.pid} on {host} is no longer node {rank} of {stage} " \
                   f"({output.strip()}, not {group.start_ticks}): not signalled"
        return ""


BACKEND = SshBackend
