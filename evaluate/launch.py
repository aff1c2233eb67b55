"""Where evaluate/run.py's work runs: here, or on a Slurm cluster through submitit.

- `--launcher local` (default): this process does the work; under torchrun each process does its share (the
  frozen-feature tasks shard extraction over ranks, rank 0 writes the records).
- `--launcher slurm`: one job per checkpoint x task group (`evaluate.plan.task_groups`: the frozen-feature
  tasks together, each training task alone), or one job array of them (`--array`), submitted with submitit
  (the launcher DINO, DINOv2 and VISSL users know). Each job runs `evaluate/run.py --launcher local` on its
  checkpoint and tasks and writes its records atomically into the one `--out` folder. On preemption or
  time-out, submitit calls `EvalJob.checkpoint()`, which requeues the job with `--resume` (the SGD probes
  continue from their last epoch; finished tasks are skipped by their records). `--wait` follows the jobs
  with a progress bar, then writes the summary, the tables and prints the final table.

Slurm settings come from flags or a YAML file (`--slurm-config`, flags win):

    partition: gpu           # --partition
    gpus_per_job: 1          # --gpus-per-job (sbatch --gpus-per-node; one process per job)
    cpus_per_task: 8         # --cpus-per-task
    mem_gb: 64               # --mem-gb
    time: "12:00:00"         # --time (minutes, HH:MM:SS or D-HH:MM:SS, as sbatch reads it)
    account: myproject       # --account
    sbatch_opt:              # --sbatch-opt KEY=VALUE (repeatable): any other sbatch option
      qos: high
      constraint: volta32gb
"""
import os
import re
import sys
import time
from pathlib import Path

from core.cli import UserError
from core.files import REPO_ROOT

SLURM_KEYS = ("partition", "gpus_per_job", "cpus_per_task", "mem_gb", "time", "account", "sbatch_opt",
              "array_parallelism")
# Options of evaluate/run.py that concern the submission, not the work: a job's command drops them (value: takes
# an argument).
SUBMISSION_OPTIONS = {"--launcher": True, "--partition": True, "--gpus-per-job": True, "--cpus-per-task": True,
                      "--mem-gb": True, "--time": True, "--account": True, "--sbatch-opt": True,
                      "--slurm-config": True, "--array": False, "--wait": False, "--jobs-dir": True,
                      "--ckpt": True, "--task": True, "--out": True, "--data-root": True, "--no-report": False}
# sbatch sends USR2 this long before the time limit, so that the job requeues itself before it is killed
# (submitit's default is 90 s; a record write and a probe state save take seconds).
SIGNAL_DELAY_S = 120


def add_launcher_options(p):
    g = p.add_argument_group("launcher (where the work runs)")
    g.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: this process (or each process of torchrun); slurm: one job per checkpoint x task "
                        "group through submitit")
    g.add_argument("--slurm-config", type=Path, help="YAML file of Slurm settings (keys: " + ", ".join(SLURM_KEYS)
                                                     + "); flags override it")
    g.add_argument("--partition")
    g.add_argument("--gpus-per-job", type=int)
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem-gb", type=float)
    g.add_argument("--time", help="time limit per job: minutes, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--account")
    g.add_argument("--sbatch-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. qos=high or constraint=volta32gb (repeatable)")
    g.add_argument("--array", action="store_true", help="submit the jobs as one Slurm job array")
    g.add_argument("--jobs-dir", type=Path, help="where submitit keeps job files and logs (default <out>/jobs)")
    g.add_argument("--wait", action="store_true", help="follow the jobs with a progress bar, then print the table")


def parse_time(text) -> int:
    """sbatch's --time formats -> minutes: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise UserError(f"--time {text}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        minutes = int(days) * 1440 + int(a) * 60 + int(b or 0) + (int(c or 0) > 0)
    elif c is not None:  # H:M:S
        minutes = int(a) * 60 + int(b) + (int(c) > 0)
    elif b is not None:  # M:S
        minutes = int(a) + (int(b) > 0)
    else:
        minutes = int(a)
    if minutes <= 0:
        raise UserError(f"--time {text}: the time limit must be positive")
    return minutes


def _sbatch_options(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise UserError(f"--sbatch-opt {item}: expected KEY=VALUE, e.g. qos=high")
        out[key.strip().replace("_", "-")] = value.strip()
    return out


def slurm_settings(args) -> dict:
    """The Slurm settings: the YAML file's, then the flags'."""
    import yaml

    values = {}
    if args.slurm_config is not None:
        try:
            values = yaml.safe_load(args.slurm_config.read_text()) or {}
        except OSError:
            raise UserError(f"--slurm-config {args.slurm_config} cannot be read") from None
        except yaml.YAMLError as e:
            raise UserError(f"--slurm-config {args.slurm_config} is not valid YAML ({str(e).splitlines()[0]})") \
                from None
        if not isinstance(values, dict):
            raise UserError(f"--slurm-config {args.slurm_config} is not a mapping of key: value")
        unknown = sorted(set(values) - set(SLURM_KEYS))
        if unknown:
            raise UserError(f"--slurm-config {args.slurm_config}: unknown key {unknown[0]!r}; valid keys: "
                            + ", ".join(SLURM_KEYS))
    sbatch = values.get("sbatch_opt") or {}
    if isinstance(sbatch, list):
        sbatch = _sbatch_options(sbatch)
    elif not isinstance(sbatch, dict):
        raise UserError("--slurm-config: sbatch_opt must be a mapping (qos: high) or a list of KEY=VALUE")
    sbatch = {str(k).replace("_", "-"): str(v) for k, v in sbatch.items()}
    sbatch.update(_sbatch_options(args.sbatch_opt))
    for key in ("partition", "gpus_per_job", "cpus_per_task", "mem_gb", "time", "account"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    values["sbatch_opt"] = sbatch
    return values


def executor_parameters(settings: dict) -> dict:
    """Slurm settings -> submitit SlurmExecutor parameters (one task per job; the job's one process sees its
    GPUs, Detectron2 launches over them itself)."""
    params = {"job_name": "ssl-eval", "nodes": 1, "ntasks_per_node": 1, "signal_delay_s": SIGNAL_DELAY_S,
              "setup": [f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]}
    if settings.get("partition"):
        params["partition"] = str(settings["partition"])
    if settings.get("gpus_per_job") is not None:
        params["gpus_per_node"] = int(settings["gpus_per_job"])
    if settings.get("cpus_per_task") is not None:
        params["cpus_per_task"] = int(settings["cpus_per_task"])
    if settings.get("mem_gb") is not None:
        gb = float(settings["mem_gb"])
        params["mem"] = f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"
    params["time"] = parse_time(settings.get("time", "4:00:00"))
    if settings.get("account"):
        params["account"] = str(settings["account"])
    if settings.get("array_parallelism") is not None:
        params["array_parallelism"] = int(settings["array_parallelism"])
    if settings.get("sbatch_opt"):
        params["additional_parameters"] = dict(settings["sbatch_opt"])
    return params


def make_executor(kind: str, folder: Path, settings: dict):
    """A submitit executor: `slurm` (sbatch) or `local` (real subprocesses on this machine, with submitit's
    own preemption and requeue; what the tests use)."""
    import submitit

    if kind == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
        except RuntimeError as e:  # no srun: not on a Slurm cluster
            raise UserError(f"--launcher slurm: {e}") from None
        executor.update_parameters(**executor_parameters(settings))
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=parse_time(settings.get("time", "4:00:00")),
                               signal_delay_s=SIGNAL_DELAY_S)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return executor


class EvalJob:
    """One job: `evaluate/run.py ARGV` in the job's process. submitit's checkpoint protocol: on preemption or
    time-out `checkpoint()` gives the job to requeue, the same command with --resume."""

    def __init__(self, argv):
        self.argv = list(argv)

    def __call__(self):
        from core.cli import run_cli
        from evaluate.run import main

        code = run_cli(main, self.argv)
        if code != 0:
            raise RuntimeError(f"evaluate/run.py {' '.join(self.argv)} exited with code {code} (its log says why)")
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit

        argv = self.argv if "--resume" in self.argv else self.argv + ["--resume"]
        return submitit.helpers.DelayedSubmission(EvalJob(argv))


def strip_options(argv, options=SUBMISSION_OPTIONS) -> list:
    """argv without `options` (both `--opt value` and `--opt=value`)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in options:
            skip = options[name] and "=" not in item
            continue
        out.append(item)
    return out


def job_argv(argv, ckpt, tasks, out_dir: Path, data_root=None) -> list:
    """One job's evaluate/run.py command: the user's, on one checkpoint and one task group, writing into the
    one records folder, without the submission's options."""
    args = strip_options(argv) + ["--ckpt", ckpt if ckpt == "random" else str(Path(ckpt).resolve()),
                                  "--task", ",".join(tasks), "--out", str(Path(out_dir).resolve()),
                                  "--launcher", "local", "--no-report"]
    if data_root is not None:
        args += ["--data-root", str(Path(data_root).resolve())]
    return args


def submit_jobs(executor, commands, array=False) -> list:
    """Submit one EvalJob per command (one job array with `array`); the jobs."""
    if array:
        with executor.batch():
            jobs = [executor.submit(EvalJob(c)) for c in commands]
        return jobs
    return [executor.submit(EvalJob(c)) for c in commands]


# how often --wait asks the scheduler about the jobs (each ask of a Slurm executor runs sacct)
POLL_S = 5.0


def follow(jobs, out=None) -> list:
    """A progress bar over the jobs until all are done; the failed ones as (job, error text)."""
    from tqdm import tqdm

    out = sys.stderr if out is None else out
    failed, finished = [], set()
    with tqdm(total=len(jobs), desc="jobs", unit="job", file=out) as bar:
        while len(finished) < len(jobs):
            for job in jobs:
                if job.job_id not in finished and job.done():
                    finished.add(job.job_id)
                    bar.update(1)
                    error = job.exception()
                    if error is not None:
                        failed.append((job, str(error).strip().splitlines()[-1]))
            if len(finished) < len(jobs):
                time.sleep(POLL_S)
    return failed


def submit(args, argv, work, kind="slurm") -> int:
    """--launcher slurm: `work` is [(CheckpointFile, [task names])] still to do; one job each."""
    from evaluate.plan import task_groups

    settings = slurm_settings(args)
    folder = (args.jobs_dir or args.out / "jobs").resolve() / "%j"
    commands = [job_argv(argv, ckpt.path, group, args.out, None if args.demo else args.data_root)
                for ckpt, names in work for group in task_groups(names)]
    if not commands:
        print(f"nothing new: every run of this command has a record in {args.out / 'records'} (--force redoes them)")
        return 0
    executor = make_executor(kind, folder, settings)
    jobs = submit_jobs(executor, commands, args.array)
    print(f"submitted {len(jobs)} job{'s' * (len(jobs) != 1)}"
          f"{' as one array' if args.array else ''} (logs under {folder.parent}): "
          + " ".join(j.job_id for j in jobs))
    if not args.wait:
        print(f"records go to {args.out / 'records'}; python evaluate/report.py --records {args.out} builds the "
              "tables once they are done")
        return 0
    failed = follow(jobs)
    from results.record import write_summary
    from results.report import final_table, write_report

    write_summary(args.out)
    if not args.no_report:
        write_report(args.out, args.out / "tables")
    print(final_table(args.out, [ckpt.path for ckpt, _ in work], [n for _, names in work for n in names]))
    for job, error in failed:
        print(f"job {job.job_id} failed: {error} (log: {job.paths.stderr})")
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} jobs failed; rerun the command to redo only those")
    return 0

