"""A real Slurm cluster for the ops tests: the Ansible slurm role applied to this machine (``-c local``).

The session fixture ``slurm_cluster`` runs ``ansible/slurm.yml`` twice with ``tests/ops/ansible/slurm_localhost.yml``
(munged, slurmctld and two slurmd ``n1``/``n2`` on ports 17001/17002 with 4 fake GPUs each, every file under one
temporary root), keeps both runs' output for the idempotence test, and stops the daemons (after cancelling any job
left) when the session ends. Needs root and Debian's Slurm 22.05 packages (the role installs them if missing).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._requirements import require_root, unavailable

REPO = Path(__file__).resolve().parents[2]
OPS_BIN = REPO / ".venv-ops" / "bin"
TEST_VARS = Path(__file__).with_name("ansible") / "slurm_localhost.yml"
TEST_INVENTORY = Path(__file__).with_name("ansible") / "localhost.ini"
NODES = ("n1", "n2")
FAKE_GPUS_PER_NODE = 4  # slurm_fake_gpu_count in slurm_localhost.yml
_RECAP = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def ops_tool(name: str) -> str:
    """A tool of the ops virtualenv (.venv-ops), or skip when it is not installed."""
    path = OPS_BIN / name
    if not path.exists():
        unavailable(f"{path} missing: make ops-setup")
    return str(path)


def recap(output: str) -> dict[str, int]:
    """``{'ok': .., 'changed': .., 'unreachable': .., 'failed': ..}`` from an ansible-playbook PLAY RECAP."""
    match = _RECAP.search(output)
    assert match, f"no PLAY RECAP in:\n{output[-3000:]}"
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, match.groups()), strict=True))


def run_playbook(playbook: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ops_tool("ansible-playbook"), "-i", str(TEST_INVENTORY), str(REPO / "ansible" / playbook), *args],
        cwd=REPO,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]  # submit environment: SLURM_CONF, the project's virtualenv first on PATH, gloo on loopback
    first_run: subprocess.CompletedProcess
    second_run: subprocess.CompletedProcess

    def cmd(self, *argv: str, check: bool = True) -> str:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        assert not check or proc.returncode == 0, f"{argv} failed: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def sbatch(self, *argv: str, env: dict[str, str] | None = None) -> str:
        """``sbatch [options] slurm/<template> [overrides]`` from the repository root, as users submit; the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", f"--output={self.root}/%x-%j.out", *argv],
            cwd=REPO,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"sbatch failed: {proc.stdout}\n{proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def job_field(self, job_id: str, field: str) -> str:
        match = re.search(rf"\b{field}=(\S+)", self.cmd("scontrol", "show", "job", "--oneliner", job_id))
        assert match, f"job {job_id} has no {field}"
        return match.group(1)

    def wait_for(self, job_id: str, states: set[str], timeout: float = 240) -> str:
        """Poll until the job's state is one of ``states``; fail early on a terminal state not wanted."""
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}:
                break
            time.sleep(1)
        logs = [*self.root.glob(f"*-{job_id}.out"), *self.root.glob(f"runs/*/slurm_logs/job{job_id}-*/node*.log")]
        tails = "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in logs)
        raise AssertionError(f"job {job_id} is {state}, expected one of {states}; logs:\n{tails}")


def _stop_daemons(root: Path) -> None:
    env = {**os.environ, "SLURM_CONF": str(root / "etc" / "slurm.conf")}
    if (root / "etc" / "slurm.conf").exists():
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=30)
        time.sleep(1)
    script = root / "etc" / "slurm-direct-daemon"
    if script.exists():
        for argv in [("slurmd", node) for node in NODES] + [("slurmctld",), ("munged",)]:
            subprocess.run([str(script), "stop", *argv], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    require_root("the Slurm role test creates device nodes and runs the daemons")
    ops_tool("ansible-playbook")
    # A short path: munged's socket lives under it (unix socket paths are limited to 108 bytes).
    root = Path(tempfile.mkdtemp(prefix="ic-slurm-", dir="/tmp"))
    root.chmod(0o755)  # munged requires every directory up to its socket to be searchable by all users
    extra = ("-e", f"@{TEST_VARS}", "-e", f"slurm_test_root={root}")
    try:
        first = run_playbook("slurm.yml", *extra)
        assert first.returncode == 0, f"first run of the slurm role failed:\n{first.stdout[-6000:]}\n{first.stderr}"
        second = run_playbook("slurm.yml", *extra)
        assert second.returncode == 0, f"second run failed:\n{second.stdout[-6000:]}\n{second.stderr}"
        env = {
            **os.environ,
            "SLURM_CONF": str(root / "etc" / "slurm.conf"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "WANDB_MODE": "offline",
        }
        yield SlurmCluster(root, env, first, second)
    finally:
        _stop_daemons(root)
        shutil.rmtree(root, ignore_errors=True)
