"""Checks that need no cluster: ansible-lint, syntax and check-mode runs of the playbooks, shellcheck, the
K3s manifests against the Kubernetes schema, and the launcher's and resume helper's behaviour on bad input."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from mla_components.checkpointing.latest import main as latest_main
from tests._requirements import require_tool
from tests.k8s.manifests import k3s_kubernetes_version
from tests.ops.conftest import OPS_BIN, REPO, TEST_INVENTORY, ops_tool, recap

ANSIBLE = REPO / "ansible"
PLAYBOOKS = sorted(p.name for p in ANSIBLE.glob("*.yml"))
SHELL_SCRIPTS = sorted(str(p) for p in (REPO / "slurm").iterdir() if p.suffix in {".sh", ".sbatch"})
OPS_ENV = {**os.environ, "PATH": f"{OPS_BIN}{os.pathsep}{os.environ['PATH']}", "ANSIBLE_NOCOLOR": "1"}
# What each role would create on a real node; check mode must leave all of it untouched.
CHECK_MODE_ROLES = {
    "gpu_base": ["/etc/apt/sources.list.d/docker.list", "/etc/apt/sources.list.d/nvidia-container-toolkit.list"],
    "k3s": ["/usr/local/bin/k3s-install.sh", "/usr/local/bin/k3s"],
    "monitoring": ["/etc/systemd/system/dcgm-exporter.service"],
}


def run(argv, cwd=REPO, env=OPS_ENV, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_playbooks_are_the_expected_set():
    assert PLAYBOOKS == ["gpu_base.yml", "k3s.yml", "monitoring.yml", "setup_gpu_node.yml", "slurm.yml"]


def test_ansible_lint_passes_the_production_profile():
    proc = run([ops_tool("ansible-lint")], cwd=ANSIBLE)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output
    assert "skip_list" not in (ANSIBLE / ".ansible-lint").read_text()  # no rule silenced


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax_check_with_the_example_inventory(playbook):
    # the seed's entry point, run from ansible/ exactly as documented
    proc = run([ops_tool("ansible-playbook"), "-i", "inventory.ini", playbook, "--syntax-check"], cwd=ANSIBLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_entry_point_runs_every_role_on_the_example_inventory():
    proc = run([ops_tool("ansible-playbook"), "-i", "inventory.ini", "setup_gpu_node.yml", "--list-tasks"], cwd=ANSIBLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for role in ("gpu_base", "slurm", "k3s", "monitoring"):
        assert f"{role} : " in proc.stdout, f"no task of role {role} in:\n{proc.stdout}"


# What check mode must report on this bare machine: tasks that would change it, and tasks a guard skips because
# check mode cannot know an earlier task's outcome (the K3s install needs the script it would have downloaded).
CHECK_MODE_CHANGED = {
    "gpu_base": {"Add the apt source of nvidia-container-toolkit"},
    "k3s": set(),
    "monitoring": {"Install the node exporter", "Install the DCGM exporter unit"},
}
CHECK_MODE_SKIPPED = {
    "gpu_base": set(),
    "k3s": {"Download the K3s install script", "Install or upgrade the K3s server"},
    "monitoring": {"Run the node exporter", "Run the DCGM exporter"},  # the packages/units do not exist yet
}


def task_results(output: str) -> dict[str, set[str]]:
    """``{task name: {"ok", "changed", "skipping", ...}}`` from ansible-playbook's default output."""
    results: dict[str, set[str]] = {}
    task = None
    for line in output.splitlines():
        if match := re.match(r"TASK \[(?:[\w-]+ : )?(.+?)\] \*", line):
            task = match.group(1)
        elif task and (match := re.match(r"(ok|changed|skipping|failed|fatal): \[", line)):
            results.setdefault(task, set()).add(match.group(1))
    return results


@pytest.mark.parametrize("role", sorted(CHECK_MODE_ROLES))
def test_check_mode_of_roles_that_cannot_run_here(role):
    """The driver, Docker/toolkit, K3s and exporter roles need GPUs, systemd and the internet: run them in check
    mode on this machine; they must complete (guards where check mode cannot know an earlier task's result)
    and change nothing."""
    before = {path: os.path.exists(path) for path in CHECK_MODE_ROLES[role]}
    proc = run([ops_tool("ansible-playbook"), "-i", str(TEST_INVENTORY), str(ANSIBLE / f"{role}.yml"), "--check"])
    counts = recap(proc.stdout)
    assert proc.returncode == 0 and counts["failed"] == 0, proc.stdout[-5000:] + proc.stderr
    assert counts["ok"] > 0
    assert {path: os.path.exists(path) for path in before} == before
    results = task_results(proc.stdout)
    changed = {task for task, statuses in results.items() if "changed" in statuses}
    assert CHECK_MODE_CHANGED[role] <= changed, (changed, proc.stdout[-3000:])
    for task in CHECK_MODE_SKIPPED[role]:
        assert results.get(task) == {"skipping"}, (task, results.get(task))


def test_shellcheck_is_clean_on_the_slurm_templates():
    shellcheck = require_tool("shellcheck", "apt-get install shellcheck (make ops-setup)")
    assert len(SHELL_SCRIPTS) >= 5  # launch.sh and the four sbatch templates
    proc = run([shellcheck, "--severity=style", "--shell=bash", "-x", *SHELL_SCRIPTS])
    assert proc.returncode == 0, proc.stdout


def test_sbatch_templates_delegate_to_the_shared_launcher():
    for template in (REPO / "slurm").glob("*.sbatch"):
        text = template.read_text()
        directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")]
        assert "--ntasks-per-node=1" in directives, template  # one task per node: torchrun starts the ranks
        assert 'exec bash "${SLURM_SUBMIT_DIR:?submit with sbatch}/slurm/launch.sh" "$@"' in text, template
        config = next(line for line in text.splitlines() if line.startswith("export CONFIG="))
        default_config = config.split(":-", 1)[1].rstrip("}")
        assert (REPO / default_config).is_file(), f"{template.name}: default CONFIG {default_config} missing"
        if "DISTRIBUTED=0" not in text:  # training: requeue-safe
            assert {"--requeue", "--open-mode=append"} <= set(directives), template


def test_launcher_refuses_to_run_outside_slurm_or_without_a_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    outside = run(["bash", "slurm/launch.sh"], env=env, timeout=30)
    assert outside.returncode == 2 and "run this through sbatch" in outside.stderr
    env.update(SLURM_JOB_ID="1", SLURM_JOB_NAME="x", RECIPE="full_finetune_distributed", CONFIG=str(tmp_path / "no"))
    missing = run(["bash", "slurm/launch.sh"], env=env, timeout=30)
    assert missing.returncode == 2 and f"CONFIG={tmp_path / 'no'} does not exist" in missing.stderr
    venv = str(Path(sys.executable).parents[1])
    env.update(CONFIG="configs/mla_tiny/sft_distributed.yaml", NPROC_PER_NODE="two", VENV=venv)
    bad_nproc = run(["bash", "slurm/launch.sh"], env=env, timeout=30)
    assert bad_nproc.returncode == 2 and "NPROC_PER_NODE=two" in bad_nproc.stderr


def test_latest_helper_exit_codes(tmp_path, capsys):
    assert latest_main([str(tmp_path)]) == 1  # nothing to resume
    for epoch, resumable in ((0, True), (1, True), (2, False)):
        directory = tmp_path / f"epoch_{epoch}"
        directory.mkdir()
        (directory / "config.json").write_text("{}")
        if resumable:
            (directory / "recipe_state.pt").write_bytes(b"")
    capsys.readouterr()
    assert latest_main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "epoch_1")  # the final epoch holds no recipe state
    assert latest_main([]) == 2


def test_k3s_manifests_validate_against_the_kubernetes_schema(tmp_path):
    defaults = yaml.safe_load((ANSIBLE / "roles" / "k3s" / "defaults" / "main.yml").read_text())
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ANSIBLE / "roles" / "k3s" / "templates"))
    rendered = []
    for name in ("nvidia-runtimeclass.yaml", "nvidia-device-plugin.yaml"):
        text = env.get_template(f"{name}.j2").render(**defaults, ansible_managed="test")
        (tmp_path / name).write_text(text)
        rendered.append(str(tmp_path / name))
    docs = [yaml.safe_load(Path(p).read_text()) for p in rendered]
    assert docs[0]["handler"] == "nvidia" and docs[1]["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    proc = run([ops_tool("kubernetes-validate"), "--strict", "-k", k3s_kubernetes_version(), *rendered])
    assert proc.returncode == 0, proc.stdout + proc.stderr
