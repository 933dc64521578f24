"""The Ansible slurm role, applied to this machine, brings up a working cluster, and applying it again changes
nothing."""

import re
import subprocess
from pathlib import Path

from tests._requirements import require_tool
from tests.ops.conftest import FAKE_GPUS_PER_NODE, NODES, recap


def test_role_brings_up_slurmctld_and_two_slurmd_with_gpu_gres(slurm_cluster):
    first = recap(slurm_cluster.first_run.stdout)
    assert first["failed"] == 0 and first["unreachable"] == 0
    assert first["changed"] > 0  # it installed configuration and started daemons on a fresh root

    assert "is UP" in slurm_cluster.cmd("scontrol", "ping")
    sinfo = slurm_cluster.cmd("sinfo", "--noheader", "--Node", "--format=%N %t %G")
    rows = [line.split() for line in sinfo.splitlines()]
    assert sorted(rows) == [[node, "idle", f"gpu:{FAKE_GPUS_PER_NODE}"] for node in NODES]
    ports = set()
    for node in NODES:
        info = slurm_cluster.cmd("scontrol", "show", "node", "--oneliner", node)
        ports.add(re.search(r"\bPort=(\d+)", info).group(1))
        # each slurmd runs as its own process (pid file per node, written by that daemon)
        pid = (slurm_cluster.root / "run" / f"slurmd-{node}.pid").read_text().strip()
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "slurmd"
    assert ports == {"17001", "17002"}

    # gres.conf came from the (fake) devices the role found: Slurm hands out and binds them per job
    visible = slurm_cluster.cmd("srun", "--nodes=1", "--gpus-per-node=2", "printenv", "CUDA_VISIBLE_DEVICES")
    assert visible.strip() == "0,1"


def test_second_run_of_the_role_changes_nothing(slurm_cluster):
    second = recap(slurm_cluster.second_run.stdout)
    assert second == {"ok": second["ok"], "changed": 0, "unreachable": 0, "failed": 0}, slurm_cluster.second_run.stdout


def test_rendered_daemon_script_is_shellcheck_clean(slurm_cluster):
    shellcheck = require_tool("shellcheck", "apt-get install shellcheck (make ops-setup)")
    script = slurm_cluster.root / "etc" / "slurm-direct-daemon"
    proc = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
