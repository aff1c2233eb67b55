"""evaluate/launch.py: the sbatch script submitit writes from our settings, and jobs run by submitit's local
executor (real subprocesses on this machine): a job preempted in the middle requeues itself with --resume
and writes the record an uninterrupted run writes."""
import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from evaluate.launch import EvalJob, executor_parameters, job_argv, make_executor, parse_time, slurm_settings, \
    submit_jobs
from evaluate.run import cli, parse_args


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """An `srun` on PATH, so that submitit's SlurmExecutor can be built (it writes scripts; nothing is
    submitted)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def sbatch_lines(text):
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_slurm_settings_from_yaml_and_flags_render_into_the_sbatch_script(tmp_path, fake_srun):
    config = tmp_path / "slurm.yaml"
    config.write_text("partition: learnfair\ngpus_per_job: 4\ntime: '1-02:30:00'\naccount: ssl\ncpus_per_task: 10\n"
                      "mem_gb: 64\nsbatch_opt:\n  constraint: volta32gb\n  qos: low\n")
    args = parse_args(["--ckpt", "random", "--task", "knn_stl10", "--launcher", "slurm", "--slurm-config",
                       str(config), "--partition", "devlab", "--time", "90", "--sbatch-opt", "qos=high",
                       "--sbatch-opt", "mail_user=me@example.org"])
    settings = slurm_settings(args)
    executor = make_executor("slurm", tmp_path / "jobs" / "%j", settings)
    text = executor._make_submission_file_text("python -u -m submitit.core._submit JOBDIR", "uid")
    lines = sbatch_lines(text)
    for expected in ("#SBATCH --partition=devlab",  # the flag wins over the file
                     "#SBATCH --time=90",  # minutes
                     "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1",
                     "#SBATCH --cpus-per-task=10", "#SBATCH --mem=64GB", "#SBATCH --account=ssl",
                     "#SBATCH --constraint=volta32gb", "#SBATCH --qos=high", "#SBATCH --mail-user=me@example.org",
                     "#SBATCH --signal=USR2@120", "#SBATCH --job-name=ssl-eval"):
        assert expected in lines, (expected, lines)
    assert "#SBATCH --qos=low" not in lines
    assert f"export PYTHONPATH={Path(__file__).resolve().parents[1]}" in text  # jobs import the suite's modules
    assert "srun --unbuffered" in text

    args = parse_args(["--ckpt", "random", "--task", "knn_stl10", "--launcher", "slurm", "--slurm-config",
                       str(config)])
    assert executor_parameters(slurm_settings(args))["time"] == 24 * 60 + 150  # the file's D-HH:MM:SS
    assert executor_parameters(slurm_settings(args))["partition"] == "learnfair"


@pytest.mark.parametrize("text, minutes", [("30", 30), ("4:00:00", 240), ("1:30", 2), ("2-00", 2880),
                                           ("1-12:30", 2190), ("0:59:30", 60)])
def test_time_limits_read_as_sbatch_reads_them(text, minutes):
    assert parse_time(text) == minutes


def test_a_job_runs_the_users_command_on_one_checkpoint_and_task_group(tmp_path):
    argv = ["--ckpt", "runs/a/", "--task", "knn_stl10,linear_places205", "--demo", "--set", "k=5", "--launcher",
            "slurm", "--partition=gpu", "--wait", "--sbatch-opt", "qos=high", "--seeds", "0,1"]
    job = job_argv(argv, "runs/a/backbone_epoch0002.pth", ["knn_stl10"], tmp_path / "out")
    assert job == ["--demo", "--set", "k=5", "--seeds", "0,1", "--ckpt",
                   str(Path("runs/a/backbone_epoch0002.pth").resolve()), "--task", "knn_stl10", "--out",
                   str((tmp_path / "out").resolve()), "--launcher", "local", "--no-report"]
    assert EvalJob(job).checkpoint().function.argv == job + ["--resume"]  # requeued: continue, not restart
    assert EvalJob(job + ["--resume"]).checkpoint().function.argv == job + ["--resume"]


def children(pid):
    """The process ids started by `pid` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def sgd_argv(out_dir):
    # Places205's SGD probe on the demo data, 4 epochs at 32 px: it saves its state after every epoch (--resume)
    return ["--ckpt", "random", "--arch", "resnet18", "--task", "linear_places205", "--demo", "--set", "epochs=4",
            "--set", "workers=0", "--set", "resize=36", "--set", "crop=32", "--out", str(out_dir), "--no-report"]


def test_a_preempted_job_requeues_with_resume_and_writes_the_uninterrupted_record(tmp_path, capsys, demo_root):
    assert cli(sgd_argv(tmp_path / "straight")) == 0  # the uninterrupted run, in this process
    capsys.readouterr()
    straight = json.loads(next((tmp_path / "straight" / "records").rglob("*.json")).read_text())

    out = tmp_path / "jobs_out"
    executor = make_executor("local", tmp_path / "jobs" / "%j", {"time": "30"})
    [job] = submit_jobs(executor, [job_argv(sgd_argv(out), "random", ["linear_places205"], out)])
    state_dir = out / "state"
    deadline = time.time() + 300
    while not list(state_dir.glob("linear_places205__*")) and time.time() < deadline and not job.done():
        time.sleep(0.05)
    assert not job.done(), job.stderr()
    saved = json.dumps(sorted(p.name for p in state_dir.iterdir()))
    # preemption: Slurm (and submitit's local controller near a time-out) sends USR2 to the job's process
    [task_pid] = children(job._process.pid)
    os.kill(task_pid, signal.SIGUSR2)
    job.wait()
    log = job.stdout() + (job.stderr() or "")
    assert job.state in ("FINISHED", "DONE", "COMPLETED"), log
    assert "this job is preempted" in log and "Requeued job" in log, log
    assert "resumed linear_places205__" in log and "after epoch" in log, log  # continued, not restarted
    resumed_after = int(log.split("after epoch ")[1].split()[0])
    assert 1 <= resumed_after < 4, saved
    [path] = list((out / "records").rglob("*.json"))
    record = json.loads(path.read_text())
    assert record["metrics"] == straight["metrics"]  # bit-equal on the CPU
    assert record["data"]["history"] == straight["data"]["history"]
    assert record["command"].endswith("--resume")


def test_slurm_launcher_end_to_end_on_the_local_executor(tmp_path, capsys, monkeypatch, demo_root):
    """`--launcher slurm --array --wait` through evaluate/run.py, with submitit's local executor in place of
    sbatch: job ids, a progress bar, records of both checkpoints in one folder, the final table; the same
    command again submits nothing."""
    import torch
    import torchvision

    import evaluate.launch as launch

    real = launch.make_executor
    monkeypatch.setattr(launch, "make_executor", lambda kind, folder, settings: real("local", folder, settings))
    monkeypatch.setattr(launch, "POLL_S", 0.1)  # local jobs: no scheduler to spare
    torch.manual_seed(3)
    ckpt = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)
    argv = ["--ckpt", f"random,{ckpt}", "--arch", "resnet18", "--task", "knn_stl10", "--demo", "--set", "k=5",
            "--set", "resize=36", "--set", "crop=32",  # 32 px images: the jobs, not the features, are tested
            "--out", str(tmp_path / "out"), "--launcher", "slurm", "--partition", "gpu", "--array", "--wait"]
    assert cli(argv) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    line = next(l for l in out.splitlines() if l.startswith("submitted 2 jobs as one array"))
    ids = line.split(": ")[-1].split()
    assert len(ids) == 2 and all(ids)
    assert "jobs: 100%" in err.replace("\r", "\n")  # the progress bar over jobs
    recs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "records").rglob("*.json")]
    assert sorted(r["checkpoint"]["path"] for r in recs) == sorted(["random:resnet18:seed0", str(ckpt.resolve())])
    table = out[out.index("| checkpoint | epoch | task | metric | value |"):]
    assert "| random:resnet18:seed0 [demo] |  | knn_stl10 | stl10_knn5_top1 |" in table and "| r18.pth [demo] |" in table
    assert (tmp_path / "out" / "tables" / "knn.md").is_file()  # the tables, once, at the end
    assert cli(argv) == 0
    out, _ = capsys.readouterr()
    assert "nothing new" in out and "submitted" not in out
