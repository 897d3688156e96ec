"""The CI/CD pipeline definitions, checked offline by real validators, plus what ties them to `flywheel ci`.

- `.github/workflows/model-ci.yml`: actionlint (workflow syntax, `${{ }}` expression types and contexts, step
  output references, inputs of known actions, runner labels, and shellcheck on every `run:` script) and the
  GitHub-workflow JSON schema vendored in check-jsonschema.
- `.gitlab-ci.yml`: the GitLab CI JSON schema vendored in check-jsonschema, and shellcheck on the deploy script.
- `Jenkinsfile`: no offline Jenkins linter exists on PyPI or npm (Jenkins validates a declarative pipeline inside
  a running controller: `jenkins-cli declarative-linter`). So the file is parsed by a real Groovy 3 grammar
  (groovy-parser: Lark + Pygments; a syntax error fails the test), and the declarative model is then checked on
  that parse tree by `check_declarative` below: sections allowed where they stand, each stage has exactly one
  of steps/stages/parallel/matrix, `when` conditions, `post` conditions, `environment` assignments, known step
  names. That is a structural check, not Jenkins' own validation; the Deploy shell script also goes through
  shellcheck.

Every tool runs with proxies pointed at a closed local port, so a download attempt would fail the test.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from offline_tools import offline_env, tool

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "model-ci.yml"
GITLAB = ROOT / ".gitlab-ci.yml"
JENKINSFILE = ROOT / "Jenkinsfile"
DEPLOYMENT = "deploy-model/on-alias"


# ------------------------------------------------------------------------------------------------- tools
def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=offline_env(), input=stdin, timeout=60)


def actionlint(path: Path) -> subprocess.CompletedProcess:
    tool("shellcheck")  # without it actionlint silently skips the `run:` scripts
    return run(tool("actionlint"), "-no-color", "-oneline", str(path))


def jsonschema(builtin: str, *paths: Path) -> subprocess.CompletedProcess:
    return run(tool("check-jsonschema"), "--builtin-schema", builtin, *map(str, paths))


def shellcheck(script: str, shell: str) -> subprocess.CompletedProcess:
    return run(tool("shellcheck"), "--shell", shell, "--severity", "style", "-", stdin=script)


def mutated(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text()
    assert old in text, f"mutation target {old!r} not in {source.name}"
    out = tmp_path / source.name
    out.write_text(text.replace(old, new))
    return out


# ------------------------------------------------------------------------------------ Jenkinsfile (Groovy)
PIPELINE_SECTIONS = {"agent", "environment", "options", "parameters", "triggers", "tools", "libraries", "stages",
                     "post"}  # fmt: skip
STAGE_SECTIONS = {"agent", "environment", "input", "options", "post", "tools", "when", "failFast",
                  "steps", "stages", "parallel", "matrix"}  # fmt: skip
STAGE_BODIES = {"steps", "stages", "parallel", "matrix"}
WHEN_CONDITIONS = {"branch", "buildingTag", "changelog", "changeset", "changeRequest", "environment", "equals",
                   "expression", "tag", "not", "allOf", "anyOf", "triggeredBy", "beforeAgent", "beforeInput",
                   "beforeOptions"}  # fmt: skip
POST_CONDITIONS = {"always", "changed", "fixed", "regression", "aborted", "failure", "success", "unstable",
                   "unsuccessful", "cleanup"}  # fmt: skip
# Steps this pipeline may use directly under `steps` (core Pipeline plugins); `script { }` holds free Groovy.
KNOWN_STEPS = {"sh", "echo", "error", "script", "archiveArtifacts", "junit", "withCredentials", "withEnv", "dir",
               "timeout", "retry", "stash", "unstash", "writeFile", "readFile", "catchError", "warnError"}  # fmt: skip
ID_LEAVES = {"IDENTIFIER", "CAPITALIZED_IDENTIFIER"}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Call:
    """One statement of a declarative section: `name 'arg' { body }`, `NAME = value` or `name value`."""

    name: str
    strings: list[str]  # string literals outside its closure (its arguments, or an assignment's value)
    words: list[str]  # identifiers outside its closure
    assign: bool
    closures: int
    raw: dict = field(repr=False)
    body: list[Call] | None = None  # the statements of its closure, if it has one

    def section(self, name: str) -> list[Call]:
        return [c for c in self.body or [] if c.name == name]

    def one(self, name: str) -> Call:
        found = self.section(name)
        assert len(found) == 1, f"{self.name}: expected one `{name}`, found {len(found)}"
        return found[0]

    def stage(self, label: str) -> Call:
        return next(c for c in self.body or [] if c.name == "stage" and c.strings == [label])

    def all_strings(self) -> list[str]:
        return [leaf["value"] for leaf in _leaves(self.raw) if leaf["leaf"] == "STRING_LITERAL"]


def _leaves(node: dict):
    if not node:
        return
    if "leaf" in node:
        yield node
        return
    for child in node.get("children", []):
        yield from _leaves(child)


def _is_closure(node: dict) -> bool:
    rules = node.get("rule") or []
    return "closure_or_lambda_expression" in rules and rules[-1] == "block"


def _statements(block: dict) -> list[dict]:
    """The statements of a `{ ... }` block in groovy-parser's digested tree (single-child chains are flattened,
    so one statement stands in place of its `block_statements`)."""
    out: list[dict] = []
    for child in block.get("children", []):
        if not child or "leaf" in child:  # braces, pruned separators
            continue
        rules = child.get("rule") or []
        if rules and rules[-1] == "block_statements":
            out += [c for c in child.get("children", []) if c and "leaf" not in c]
        elif rules and rules[-1] != "block_statements_opt":  # an empty block
            out.append(child)
    return out


def _call(stmt: dict) -> Call:
    leaves: list[dict] = []
    closures: list[dict] = []

    def walk(node: dict) -> None:
        if not node:
            return
        if "leaf" in node:
            leaves.append(node)
        elif _is_closure(node):
            closures.append(node)  # its content is the body, not this statement's arguments
        else:
            for child in node.get("children", []):
                walk(child)

    walk(stmt)
    words = [leaf["value"] for leaf in leaves if leaf["leaf"] in ID_LEAVES]
    return Call(
        name=words[0] if words else "",
        strings=[leaf["value"] for leaf in leaves if leaf["leaf"] == "STRING_LITERAL"],
        words=words,
        assign=any(leaf["leaf"] == "ASSIGN" for leaf in leaves),
        closures=len(closures),
        raw=stmt,
        body=[_call(s) for s in _statements(closures[0])] if closures else None,
    )


@functools.cache
def _groovy_parser():
    from groovy_parser.parser import create_groovy_parser

    return create_groovy_parser()


def groovy_tree(text: str) -> dict:
    """groovy-parser's digested parse tree of a Groovy 3 source; raises lark's error on a syntax error."""
    from groovy_parser.parser import GroovyRestrictedTokenizer, digest_lark_tree

    tokens = list(GroovyRestrictedTokenizer().get_tokens(text))
    # The Earley parser makes millions of short-lived objects: with the test session's large heap, the cyclic
    # garbage collector would triple the parse time walking it again and again.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return digest_lark_tree(_groovy_parser().parse(tokens))
    finally:
        if enabled:
            gc.enable()


def top_calls(tree: dict) -> list[Call]:
    rules = tree.get("rule") or []
    stmts = tree.get("children", []) if rules and rules[-1] == "script_statements" else []
    return [_call(s) for s in stmts if s and "leaf" not in s]


def parse_groovy(text: str) -> list[Call]:
    return top_calls(groovy_tree(text))


# Parsing the Jenkinsfile takes ~6 s (an Earley parser over the whole Groovy grammar): it starts in a child process
# with this module's first test and runs beside the GitHub and GitLab checks.
_PARSE_JENKINSFILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_ci_pipelines import groovy_tree
json.dump(groovy_tree(open(sys.argv[2], encoding="utf-8").read()), sys.stdout)
"""


@pytest.fixture(scope="module", autouse=True)
def _jenkinsfile_parse():
    proc = subprocess.Popen(
        [sys.executable, "-c", _PARSE_JENKINSFILE, str(Path(__file__).parent), str(JENKINSFILE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _check_when(when: Call, where: str) -> list[str]:
    problems = []
    if not when.body:
        return [f"{where}: `{when.name}` needs at least one condition"]
    for cond in when.body:
        if cond.name not in WHEN_CONDITIONS:
            problems.append(f"{where}: unknown `when` condition '{cond.name}'")
        elif cond.name in ("not", "allOf", "anyOf"):
            if not cond.body or (cond.name == "not" and len(cond.body) != 1):
                needs = "exactly one condition" if cond.name == "not" else "conditions"
                problems.append(f"{where}: `{cond.name}` needs {needs}")
            problems += _check_when(cond, f"{where}/{cond.name}") if cond.body else []
    return problems


def _check_environment(env: Call, where: str) -> list[str]:
    if not env.body:
        return [f"{where}: empty `environment`"]
    return [f"{where}/environment: '{e.name}' is not `NAME = value`" for e in env.body
            if not e.assign or not ENV_NAME.fullmatch(e.name)]  # fmt: skip


def _check_post(post: Call, where: str) -> list[str]:
    bad = [c.name for c in post.body or [] if c.name not in POST_CONDITIONS or c.body is None]
    return [f"{where}/post: unknown condition '{name}'" for name in bad]


def _check_stages(stages: Call, where: str) -> list[str]:
    if not stages.body:
        return [f"{where}: `{stages.name}` needs at least one stage"]
    problems = []
    for st in stages.body:
        if st.name != "stage":
            problems.append(f"{where}/{stages.name}: '{st.name}' is not a stage")
            continue
        label = f"{where}/stage({st.strings[0] if st.strings else '?'})"
        if len(st.strings) != 1:
            problems.append(f"{label}: a stage takes exactly one name")
        if st.body is None or st.closures != 1:
            problems.append(f"{label}: a stage takes one block")
            continue
        names = [c.name for c in st.body]
        problems += [f"{label}: unknown section '{n}'" for n in names if n not in STAGE_SECTIONS]
        problems += [f"{label}: '{n}' given twice" for n in sorted(set(names)) if names.count(n) > 1]
        bodies = [n for n in names if n in STAGE_BODIES]
        if len(bodies) != 1:
            problems.append(f"{label}: needs exactly one of steps, stages, parallel, matrix (has {bodies})")
        for sec in st.body:
            if sec.name in STAGE_SECTIONS - {"failFast", "agent"} and sec.body is None:
                problems.append(f"{label}: `{sec.name}` needs a block")
            elif sec.name == "steps":
                if not sec.body:
                    problems.append(f"{label}: empty `steps`")
                unknown = [s.name for s in sec.body or [] if s.name not in KNOWN_STEPS]
                problems += [f"{label}/steps: unknown step '{name}'" for name in unknown]
            elif sec.name in ("stages", "parallel"):
                problems += _check_stages(sec, label)
            elif sec.name == "when":
                problems += _check_when(sec, label)
            elif sec.name == "environment":
                problems += _check_environment(sec, label)
            elif sec.name == "post":
                problems += _check_post(sec, label)
    return problems


def check_declarative(top: list[Call]) -> list[str]:
    """Problems with a declarative pipeline's structure (empty when there are none)."""
    if [c.name for c in top] != ["pipeline"] or top[0].body is None:
        return ["a declarative Jenkinsfile is one `pipeline { ... }` block"]
    pipe = top[0]
    names = [c.name for c in pipe.body]
    problems = [f"pipeline: unknown section '{n}'" for n in names if n not in PIPELINE_SECTIONS]
    problems += [f"pipeline: '{n}' given twice" for n in sorted(set(names)) if names.count(n) > 1]
    problems += [f"pipeline: `{n}` is required" for n in ("agent", "stages") if n not in names]
    for sec in pipe.body:
        if sec.name in PIPELINE_SECTIONS - {"agent", "libraries"} and sec.body is None:
            problems.append(f"pipeline: `{sec.name}` needs a block")
        elif sec.name == "stages":
            problems += _check_stages(sec, "pipeline")
        elif sec.name == "environment":
            problems += _check_environment(sec, "pipeline")
        elif sec.name == "post":
            problems += _check_post(sec, "pipeline")
    return problems


# ---------------------------------------------------------------------------------------- GitHub Actions
def test_workflow_passes_actionlint():
    proc = actionlint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""


UNQUOTED_BEFORE = 'echo "version=$(jq -r \'.version\' "$result")"'
ACTIONLINT_MUTATIONS = [
    # A step output that does not exist: only actionlint sees into expressions.
    ("steps.verdict.outputs.deploy", "steps.verdikt.outputs.deploy", 'property "verdikt" is not defined'),
    # An input actions/checkout does not have.
    ("persist-credentials: false", "persist-credential: false", 'input "persist-credential" is not defined'),
    # An unquoted substitution in a `run:` script: shellcheck, through actionlint.
    (UNQUOTED_BEFORE, "echo version=$(jq -r .version $result)", "SC2046"),
]


@pytest.mark.parametrize(("old", "new", "expected"), ACTIONLINT_MUTATIONS)
def test_actionlint_rejects_a_broken_workflow(tmp_path, old, new, expected):
    proc = actionlint(mutated(tmp_path, WORKFLOW, old, new))
    assert proc.returncode != 0
    assert expected in proc.stdout


def test_github_schema_accepts_the_workflow_and_rejects_a_broken_copy(tmp_path):
    # One run for both files (each run of the tool costs ~0.6 s of start-up); errors are reported per file.
    bad = mutated(tmp_path, WORKFLOW, "runs-on: ubuntu-latest", "runs_on: x")
    proc = jsonschema("vendor.github-workflows", WORKFLOW, bad)
    assert str(WORKFLOW) not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{bad}::$.jobs['pull-request']" in proc.stdout
    assert "'runs-on' is a required property" in proc.stdout


def test_workflow_runs_tests_then_ci_on_prs_and_deploys_only_the_champion_from_main():
    wf = yaml.safe_load(WORKFLOW.read_text())
    on = wf[True]  # YAML 1.1 reads the key `on` as a boolean
    assert "pull_request" in on and on["push"]["branches"] == ["main"]
    assert wf["permissions"] == {"contents": "read"}

    pr, main = wf["jobs"]["pull-request"], wf["jobs"]["main"]
    assert "pull_request" in pr["if"] and "refs/heads/main" in main["if"]
    pr_runs = [s.get("run", "") for s in pr["steps"]]
    assert pr_runs.index("make test") < next(i for i, r in enumerate(pr_runs) if r.startswith(".venv/bin/flywheel ci"))
    assert "secrets." not in yaml.safe_dump(pr), "the PR job must not see the team's secrets"
    assert not {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"} & set(wf.get("env", {}))

    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert main["env"][var] == f"${{{{ secrets.{var} }}}}"
    steps = {s.get("name"): s for s in main["steps"]}
    assert steps["Train and gate"]["run"].startswith(".venv/bin/flywheel ci")
    deploy = steps["Deploy the champion"]
    assert deploy["if"] == "steps.verdict.outputs.deploy == 'true'"
    assert f"prefect deployment run '{DEPLOYMENT}'" in deploy["run"]
    names = list(steps)
    assert names.index("Train and gate") < names.index("Read the verdict") < names.index("Deploy the champion")


# ---------------------------------------------------------------------------------------------- GitLab CI
def test_gitlab_schema_accepts_the_file_and_rejects_a_broken_copy(tmp_path):
    bad = mutated(tmp_path, GITLAB, "    when: always", "    when: sometimes")
    bad.write_text(bad.read_text().replace("  script:\n    - make test", "  scrpt:\n    - make test"))
    proc = jsonschema("vendor.gitlab-ci", GITLAB, bad)
    assert str(GITLAB) not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{bad}::$.train.artifacts.when: 'sometimes' is not one of" in proc.stdout
    assert f"{bad}::$.test: Additional properties are not allowed ('scrpt' was unexpected)" in proc.stdout


def test_gitlab_ci_stages_and_deploy_only_on_the_default_branch():
    ci = yaml.safe_load(GITLAB.read_text())
    assert ci["stages"] == ["build", "test", "train", "deploy"]
    assert ci["test"]["script"] == ["make test"]
    default_branch = "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH"
    for job in ("train", "deploy"):
        assert [r["if"] for r in ci[job]["rules"]] == [default_branch]
    assert [r["if"] for r in ci["train:embedded"]["rules"]] == ['$CI_PIPELINE_SOURCE == "merge_request_event"']
    # The MR job drops whatever team credentials the project exposes before `flywheel ci` runs.
    mr_script = ci["train:embedded"]["script"]
    assert mr_script[0].startswith("unset MLFLOW_TRACKING_URI PREFECT_API_URL")
    for job in ("train:embedded", "train"):
        assert any(line.startswith(".venv/bin/flywheel ci") for line in ci[job]["script"])
        assert ci[job]["artifacts"]["when"] == "always"
        assert set(ci[job]["artifacts"]["paths"]) == {".flywheel/ci-report.md", ".flywheel/ci-result.json"}
    assert ci["deploy"]["needs"] == [{"job": "train", "artifacts": True}]
    assert f"prefect deployment run '{DEPLOYMENT}'" in "\n".join(ci["deploy"]["script"])


def test_gitlab_job_scripts_pass_shellcheck():
    ci = yaml.safe_load(GITLAB.read_text())
    jobs = {name: job for name, job in ci.items() if isinstance(job, dict) and "script" in job}
    assert {"build", "test", "train:embedded", "train", "deploy"} <= set(jobs)
    for name, job in {"default": ci["default"], **jobs}.items():
        script = "\n".join(job.get("before_script", []) + job.get("script", []))
        proc = shellcheck(script, "bash")
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"


# ------------------------------------------------------------------- the declarative check, on small pipelines
BROKEN_PIPELINE = """
pipeline {
    environment { credentials('x') }
    stages {
        sh 'x'
        stage('A') { when { branch 'main' } }
        stage('B') { stepz { sh 'x' } }
        stage('C') {
            when { brunch 'main' }
            steps { sh 'x'; bogusStep 'y' }
        }
    }
}
"""


def test_declarative_check_accepts_a_minimal_pipeline_and_reports_each_mistake():
    assert check_declarative(parse_groovy("pipeline { agent any\n stages { stage('A') { steps { sh 'x' } } } }")) == []
    assert check_declarative(parse_groovy("node { stage('A') { sh 'x' } }")) == [
        "a declarative Jenkinsfile is one `pipeline { ... }` block"
    ]
    problems = check_declarative(parse_groovy(BROKEN_PIPELINE))
    assert sorted(problems) == sorted([
        "pipeline: `agent` is required",
        "pipeline/environment: 'credentials' is not `NAME = value`",
        "pipeline/stages: 'sh' is not a stage",
        "pipeline/stage(A): needs exactly one of steps, stages, parallel, matrix (has [])",
        "pipeline/stage(B): unknown section 'stepz'",
        "pipeline/stage(B): needs exactly one of steps, stages, parallel, matrix (has [])",
        "pipeline/stage(C): unknown `when` condition 'brunch'",
        "pipeline/stage(C)/steps: unknown step 'bogusStep'",
    ])  # fmt: skip


def test_groovy_syntax_errors_fail_the_parse():
    from lark.exceptions import LarkError

    with pytest.raises(LarkError):
        parse_groovy("pipeline { agent any\n stages { stage('A') { steps { sh 'x' } }\n")
    with pytest.raises(LarkError):
        parse_groovy("pipeline { agent any\n stages { stage('A' { steps { sh 'x' } } } }")


# ----------------------------------------------------------------------------------------------- Jenkinsfile
@pytest.fixture(scope="module")
def jenkinsfile(_jenkinsfile_parse) -> Call:
    out, err = _jenkinsfile_parse.communicate(timeout=120)
    assert _jenkinsfile_parse.returncode == 0, f"the Jenkinsfile does not parse as Groovy:\n{err[-3000:]}"
    top = top_calls(json.loads(out))
    problems = check_declarative(top)
    assert problems == [], "\n".join(problems)
    return top[0]


def _credentials(env: Call) -> dict[str, str]:
    """`NAME = credentials('id')` entries of an environment block."""
    return {e.name: e.strings[0] for e in env.body or [] if e.assign and "credentials" in e.words and e.strings}


def test_jenkinsfile_is_a_valid_declarative_pipeline_with_the_five_stages(jenkinsfile):
    stages = jenkinsfile.one("stages")
    assert [s.strings[0] for s in stages.section("stage")] == ["Build", "Test", "Train", "Evaluate", "Deploy"]
    assert "make install" in stages.stage("Build").all_strings()
    assert "make test" in stages.stage("Test").all_strings()


def test_jenkinsfile_trains_with_flywheel_ci_and_team_credentials_only_on_main(jenkinsfile):
    train = jenkinsfile.one("stages").stage("Train").one("stages")
    embedded, team = train.stage("Train (embedded default)"), train.stage("Train (team servers)")
    for st in (embedded, team):
        assert any(s.startswith(".venv/bin/flywheel ci --report") for s in st.all_strings())
    assert embedded.one("when").body[0].name == "not"
    assert embedded.one("when").body[0].body[0].strings == ["main"]
    assert embedded.section("environment") == []
    assert [(c.name, c.strings) for c in team.one("when").body] == [("branch", ["main"])]
    creds = _credentials(team.one("environment"))
    assert set(creds) == {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_jenkinsfile_publishes_the_report_then_deploys_on_main_only(jenkinsfile):
    stages = jenkinsfile.one("stages")
    evaluate = stages.stage("Evaluate").one("steps")
    archive = evaluate.one("archiveArtifacts")
    assert ".flywheel/ci-report.md" in archive.strings[0] and ".flywheel/ci-result.json" in archive.strings[0]
    deploy = stages.stage("Deploy")
    assert [(c.name, c.strings) for c in deploy.one("when").body] == [("branch", ["main"])]
    assert set(_credentials(deploy.one("environment"))) == {"PREFECT_API_URL"}
    (script,) = deploy.one("steps").one("sh").strings
    assert f"prefect deployment run '{DEPLOYMENT}'" in script


def test_jenkins_deploy_script_passes_shellcheck(jenkinsfile):
    (script,) = jenkinsfile.one("stages").stage("Deploy").one("steps").one("sh").strings
    assert script == jenkins_deploy_script()
    # Groovy's ''' strings: a backslash before a newline joins the lines; `\\` is one backslash.
    script = script.replace("\\\n", "").replace("\\\\", "\\")
    proc = shellcheck(script, "sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -------------------------------------------------------------------------- pipelines ↔ `flywheel ci`
TRIPLE = "'" * 3


def jenkins_deploy_script() -> str:
    """The Deploy stage's `sh` script, cut out of the Jenkinsfile's text (the full parse is tested above)."""
    text = JENKINSFILE.read_text()
    deploy = text[text.index("stage('Deploy')") :]
    begin = deploy.index(TRIPLE) + 3
    return deploy[begin : deploy.index(TRIPLE, begin)]


def deploy_scripts() -> dict[str, str]:
    wf = yaml.safe_load(WORKFLOW.read_text())
    github = next(s["run"] for s in wf["jobs"]["main"]["steps"] if s.get("name") == "Deploy the champion")
    gitlab = "\n".join(yaml.safe_load(GITLAB.read_text())["deploy"]["script"])
    return {"github": github, "gitlab": gitlab, "jenkins": jenkins_deploy_script()}


def prefect_params(script: str, values: dict[str, str]) -> list[str]:
    """The `-p` arguments of the script's `prefect deployment run` as the shell passes them: the shell's own word
    splitting removes the quotes, then `$VAR` and `$(field key)` become what they print."""
    cmd = script[script.index("prefect deployment run") :].replace("\\\n", " ").splitlines()[0]
    words = shlex.split(cmd)
    params = [words[i + 1] for i, w in enumerate(words) if w == "-p"]
    pattern = re.compile(r"\$\(field (\w+)\)|\$(\w+)")
    return [pattern.sub(lambda m: values[m.group(1) or m.group(2)], p) for p in params]


def test_pipelines_read_the_keys_ci_result_json_has():
    from flywheel.cli.ci import ci_summary

    keys = set(ci_summary({"status": "registered", "model_name": "m", "version": "3", "promoted": True}))
    scripts = deploy_scripts()
    used = {"github": set(re.findall(r"jq -r '\.(\w+)'", WORKFLOW.read_text()))}
    used |= {where: set(re.findall(r"field (\w+)", scripts[where])) for where in ("gitlab", "jenkins")}
    for where, fields in used.items():
        assert fields == {"deploy", "model_name", "version"}, where
        assert fields <= keys, where


def test_deploy_commands_name_a_real_deployment_and_pass_version_as_a_string():
    """Prefect reads each `-p key=value` as JSON: `version=3` would be the integer 3, which the deployment's
    parameter schema (str) rejects. Each pipeline quotes the values; this runs Prefect's own parser on them."""
    from prefect.cli._utilities import load_json_key_values

    from flywheel.flows.deploy import deploy_model

    prefect_yaml = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    flow_name, dep_name = DEPLOYMENT.split("/")
    assert any(d["name"] == dep_name and d["entrypoint"].endswith(":deploy_model") for d in prefect_yaml["deployments"])
    assert deploy_model.name == flow_name
    accepted = set(inspect.signature(deploy_model.fn).parameters)

    # GitHub passes step outputs (plain text) through env; GitLab and Jenkins print JSON values with `field`.
    values = {"MODEL_NAME": "flights-delay", "MODEL_VERSION": "3", "model_name": '"flights-delay"', "version": '"3"'}
    for where, script in deploy_scripts().items():
        parsed = load_json_key_values(prefect_params(script, values), "parameter")
        assert parsed == {"name": "flights-delay", "version": "3", "alias": "champion", "trigger": "ci"}, where
        assert set(parsed) <= accepted, where
