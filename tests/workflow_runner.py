"""A small runner for GitHub Actions workflow files, so tests can run the project's workflows offline.

It runs one job's steps in order, as GitHub's runner does on Linux:

- a `run:` step is the script verbatim, run by `bash --noprofile --norc -eo pipefail FILE` (GitHub's default shell)
  in the job's workspace (`GITHUB_WORKSPACE`), with the `env:` of the workflow, the job and the step merged (the
  later wins) over a base environment the caller gives, plus `CI`, `GITHUB_ACTIONS`, `GITHUB_WORKSPACE`,
  `GITHUB_EVENT_NAME`, `GITHUB_REF`, `GITHUB_REF_NAME`, `GITHUB_SHA` and `RUNNER_TEMP`;
- the command files: `$GITHUB_ENV` (`NAME=value` and `NAME<<DELIMITER` blocks, set for the later steps),
  `$GITHUB_PATH` (prepended to PATH for the later steps), `$GITHUB_OUTPUT` (`steps.<id>.outputs.<name>`) and
  `$GITHUB_STEP_SUMMARY` (one file per step, as on GitHub; the job's summary is their concatenation);
- `${{ ... }}` expressions, anywhere (env, with, if, run): only a dotted name (`secrets.X`, `inputs.X`, `vars.X`,
  `github.X`, `steps.ID.outputs.NAME`) looked up in the context the caller gives. A name the context lacks, or
  any other expression (operators, functions, literals), raises `UnknownExpression`: the test fails rather than
  run a step with a guessed value;
- `if:` takes `always()`, `success()`, `failure()`, `cancelled()` or `NAME == 'literal'` / `NAME != 'literal'`;
  without a status function the condition also needs `success()`, as on GitHub. After a failed step the later
  steps are skipped unless their `if:` says `always()` or `failure()`, and the job fails;
- what a step leaves running in the background is killed when the job ends (GitHub's runner does the same with
  orphan processes): every step runs in its own process group, and the groups are signalled at the end.

`uses:` steps are emulated for the two actions the workflows use:

- `actions/checkout`: `git clone` of the caller's `remote` (a bare repository standing in for GitHub) at the
  job's ref (a branch, or a tag: then detached, as on GitHub) into the workspace. `persist-credentials` is
  accepted and has nothing to do (there are no credentials here); any other input is refused;
- `actions/setup-python`: nothing: the test's environment already has its Python; `python-version` must be given.

Any other action raises. Ignored, having no meaning offline: `runs-on`, `timeout-minutes`, `concurrency`,
`environment` (GitHub's deployment protection and environment secrets), `permissions` (what the job's token may
do: zizmor audits it), `name`. Refused: `needs`, `strategy`, `services`, `container`, `continue-on-error`,
`working-directory` and any `shell:` but bash. A caller may replace a step's script by name (`replace=`), e.g. the
CI job's `make test` by a cheap command; a name that no step has raises, so a renamed step is not skipped silently.

`triggered(workflow, event, ref)` says whether an event starts a workflow, from its `on:` (push with branches,
branches-ignore, tags, tags-ignore; pull_request; workflow_dispatch; schedule). Ref filters are matched with
`fnmatch`, where `*` also matches `/` (on GitHub only `**` does): fine for the plain names used here.
"""
from __future__ import annotations

import fnmatch
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
NAME = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*")
STATUS = {"always()", "success()", "failure()", "cancelled()"}
ACTIONS = ("actions/checkout@", "actions/setup-python@")
UNSUPPORTED_JOB_KEYS = {"needs", "strategy", "services", "container", "continue-on-error", "defaults"}


class UnknownExpression(Exception):
    "An expression the runner cannot evaluate from the context it was given."


@dataclass
class StepResult:
    name: str
    outcome: str          # success, failure or skipped
    returncode: int | None
    output: str           # stdout and stderr of a run: step


@dataclass
class JobResult:
    job: str
    workspace: Path
    steps: list[StepResult] = field(default_factory=list)
    summary: str = ""

    @property
    def ok(self) -> bool: return all(s.outcome != "failure" for s in self.steps)

    def step(self, name: str) -> StepResult: return next(s for s in self.steps if s.name == name)

    def log(self) -> str:
        return "\n".join(f"--- {s.name}: {s.outcome} (exit {s.returncode})\n{s.output[-4000:]}" for s in self.steps)


def load_workflow(path: Path) -> dict:
    "The workflow at `path`; PyYAML reads the key `on` as True, put back here."
    wf = yaml.safe_load(Path(path).read_text())
    if True in wf: wf["on"] = wf.pop(True)
    return wf


def _lookup(expr: str, context: dict) -> str:
    if not NAME.fullmatch(expr): raise UnknownExpression(f"unsupported expression: ${{{{ {expr} }}}}")
    value = context
    for part in expr.split("."):
        if not isinstance(value, dict) or part not in value: raise UnknownExpression(f"not in the runner's context: ${{{{ {expr} }}}}")
        value = value[part]
    if isinstance(value, bool): return str(value).lower()
    return "" if value is None else str(value)


def substitute(text, context: dict) -> str:
    "`text` with every `${{ name }}` replaced from `context`; anything else raises `UnknownExpression`."
    if isinstance(text, bool): return str(text).lower()
    return EXPRESSION.sub(lambda m: _lookup(m.group(1), context), str(text))


def _condition(cond, context: dict, failed: bool) -> bool:
    if cond is None: return not failed
    m = EXPRESSION.fullmatch(str(cond).strip())
    expr = (m.group(1) if m else str(cond)).strip()
    if expr in STATUS: return {"always()": True, "success()": not failed, "failure()": failed, "cancelled()": False}[expr]
    cmp = re.fullmatch(r"(\S+)\s*(==|!=)\s*'([^']*)'", expr)
    if not cmp: raise UnknownExpression(f"unsupported if: {cond}")
    value = _lookup(cmp.group(1), context)
    return not failed and ((value == cmp.group(3)) == (cmp.group(2) == "=="))


def _command_file(path: Path) -> dict:
    "NAME=value lines and NAME<<DELIMITER blocks of a GITHUB_ENV / GITHUB_OUTPUT file."
    out, lines = {}, path.read_text().splitlines() if path.exists() else []
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            end = lines.index(delim, i + 1)
            out[name] = "\n".join(lines[i + 1:end])
            i = end + 1
            continue
        if line.strip():
            name, sep, value = line.partition("=")
            if not sep: raise ValueError(f"{path.name}: not NAME=value: {line!r}")
            out[name] = value
        i += 1
    return out


def triggered(workflow: dict, event: str, ref: str = "") -> bool:
    "Whether `event` (push, pull_request, workflow_dispatch, schedule) on `ref` (refs/heads/X, refs/tags/Y) starts `workflow`."
    on = workflow["on"]
    if isinstance(on, str): on = [on]
    if isinstance(on, list): on = {e: None for e in on}
    if event not in on: return False
    spec = on[event] or {}
    if event != "push" or not any(k in spec for k in ("branches", "branches-ignore", "tags", "tags-ignore")): return True
    kind, name = ("branches", ref.removeprefix("refs/heads/")) if ref.startswith("refs/heads/") else ("tags", ref.removeprefix("refs/tags/"))
    match = lambda patterns: any(fnmatch.fnmatchcase(name, p) for p in patterns)
    if kind in spec: return match(spec[kind])
    if f"{kind}-ignore" in spec: return not match(spec[f"{kind}-ignore"])
    return False   # only the other kind of ref is filtered: this kind does not start the workflow


def _uses(step: dict, with_: dict, *, remote: Path, ref: str, workspace: Path) -> str:
    action = step["uses"]
    if action.startswith("actions/checkout@"):
        if set(with_) - {"persist-credentials"}: raise UnknownExpression(f"checkout inputs not emulated: {sorted(with_)}")
        r = subprocess.run(["git", "clone", "-q", "--branch", ref.split("/", 2)[-1], str(remote), str(workspace)],
                           capture_output=True, text=True)
        if r.returncode: raise RuntimeError(f"checkout of {ref} failed: {r.stderr}")
        return f"cloned {remote.name} at {ref}"
    if action.startswith("actions/setup-python@"):
        if "python-version" not in with_: raise UnknownExpression("setup-python without python-version")
        return f"setup-python {with_['python-version']}: the test's environment already has its Python"
    raise UnknownExpression(f"action not emulated: {action}")


def _kill_groups(groups: list[int]):
    "Signal every process group a step left behind: TERM, then KILL what is still there."
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for g in groups:
            try: os.killpg(g, sig); alive.append(g)
            except ProcessLookupError: pass
        if not alive: return
        time.sleep(3)


def run_job(
    workflow_path: Path,   # the workflow file
    job_id: str,           # the job to run
    *,
    remote: Path,          # the bare repository checkout clones
    ref: str,              # refs/heads/BRANCH or refs/tags/TAG the event is about
    event: str,            # push, workflow_dispatch, schedule, ...
    workspace: Path,       # an empty folder to check out into (GITHUB_WORKSPACE)
    context: dict,         # secrets, inputs, vars, github: what expressions may name
    base_env: dict,        # the machine's environment (PATH, HOME, ...)
    replace: dict | None = None,   # step name -> script run instead of the step
    step_timeout: float = 1200,
) -> JobResult:
    "Run the steps of `job_id` in order, as described at the top of this module; return what each did."
    wf = load_workflow(workflow_path)
    job = wf["jobs"][job_id]
    if bad := UNSUPPORTED_JOB_KEYS & set(job): raise UnknownExpression(f"job keys not emulated: {sorted(bad)}")
    replace = dict(replace or {})
    if missing := set(replace) - {s.get("name") for s in job["steps"]}: raise KeyError(f"no step named {sorted(missing)}")
    workspace, temp = Path(workspace), Path(workspace).parent / f"{Path(workspace).name}.runner"
    temp.mkdir(parents=True)
    sha = subprocess.run(["git", "rev-parse", ref], cwd=remote, capture_output=True, text=True, check=True).stdout.strip()
    context = {**context, "steps": {}}
    github_env = {"CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(workspace), "GITHUB_EVENT_NAME": event,
                  "GITHUB_REF": ref, "GITHUB_REF_NAME": ref.split("/", 2)[-1], "GITHUB_SHA": sha, "RUNNER_TEMP": str(temp)}
    set_env, paths, groups = {}, [], []
    result, failed = JobResult(job_id, workspace), False
    try:
        for i, step in enumerate(job["steps"]):
            name = step.get("name") or step.get("uses") or f"step {i}"
            if not _condition(step.get("if"), context, failed):
                result.steps.append(StepResult(name, "skipped", None, ""))
                continue
            if step.get("shell", "bash") != "bash" or "working-directory" in step or "continue-on-error" in step:
                raise UnknownExpression(f"{name}: shell/working-directory/continue-on-error not emulated")
            env = {**base_env, **github_env, **set_env}
            for scope in (wf.get("env") or {}, job.get("env") or {}, step.get("env") or {}):
                env.update({k: substitute(v, context) for k, v in scope.items()})
            if paths: env["PATH"] = os.pathsep.join([*reversed(paths), env.get("PATH", "")])
            if "uses" in step:
                output = _uses(step, {k: substitute(v, context) for k, v in (step.get("with") or {}).items()},
                               remote=remote, ref=ref, workspace=workspace)
                result.steps.append(StepResult(name, "success", 0, output))
                continue
            script = substitute(replace.get(name, step["run"]), context)
            files = {k: temp / f"{k.lower()}-{i}" for k in ("GITHUB_ENV", "GITHUB_PATH", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY")}
            for f in files.values(): f.touch()
            (temp / f"step-{i}.sh").write_text(script)
            log = temp / f"step-{i}.log"
            with open(log, "wb") as out:   # a file, not a pipe: a background process must not hold the step open
                p = subprocess.Popen(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(temp / f"step-{i}.sh")], cwd=workspace,
                                     env={**env, **{k: str(f) for k, f in files.items()}}, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
                groups.append(p.pid)
                try: code = p.wait(timeout=step_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    code = p.wait()
            set_env.update(_command_file(files["GITHUB_ENV"]))
            paths += [line for line in files["GITHUB_PATH"].read_text().splitlines() if line.strip()]
            if "id" in step: context["steps"][step["id"]] = {"outputs": _command_file(files["GITHUB_OUTPUT"])}
            result.summary += files["GITHUB_STEP_SUMMARY"].read_text()
            result.steps.append(StepResult(name, "success" if code == 0 else "failure", code, log.read_text(errors="replace")))
            failed = failed or code != 0
    finally:
        _kill_groups(groups)
    return result
