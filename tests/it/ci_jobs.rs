//! The CI jobs shipped for wpimg's users (.github/workflows/image.yml, .gitlab-ci.yml):
//! parsed as YAML and checked for the steps, permissions and commands they must have (signing
//! with a KMS key, `wpimg verify`, the SBOM kept as an artifact); the shell that extracts the
//! image URI and the local reference is run for real (bash + jq) against sample `--json` output.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const GITHUB_WORKFLOW: &str = ".github/workflows/image.yml";
const GITLAB_CI: &str = ".gitlab-ci.yml";
const SAMPLE_LOCAL_REF: &str = "wordpress:latest";
const SAMPLE_URI: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/wordpress:6.6-abc1234@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn load(rel: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn github_steps(wf: &Value) -> &Vec<Value> {
    wf["jobs"]["image"]["steps"]
        .as_array()
        .expect("jobs.image.steps must be a list")
}

/// Index and value of the one step whose `field` satisfies `pred`.
fn find_step<'a>(
    steps: &'a [Value],
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (usize, &'a Value) {
    let found: Vec<_> = steps.iter().enumerate().filter(|(_, s)| pred(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one step that {what}, found {}",
        found.len()
    );
    found[0]
}

fn run_of(step: &Value) -> &str {
    step["run"].as_str().unwrap_or("")
}

/// The `wpimg build` command line (one line of a script, without a trailing pipe).
fn wpimg_build_line(script: &str) -> &str {
    let lines: Vec<_> = script
        .lines()
        .filter(|l| l.contains("wpimg build"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one `wpimg build` line in:\n{script}"
    );
    lines[0]
}

/// Asserts the build command has every flag the job relies on; returns the file names it
/// writes: (manifest, events file it tees stdout into).
fn check_build_command(line: &str, git_sha: &str) -> (String, String) {
    let (cmd, tee) = line
        .split_once('|')
        .unwrap_or_else(|| panic!("wpimg build output must be piped to tee: {line}"));
    // A GitHub expression `${{ x }}` is one word of the command.
    let compact = |s: &str| s.replace("${{ ", "${{").replace(" }}", "}}");
    let cmd = compact(cmd);
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "wpimg")
        .expect("the command runs wpimg");
    assert_eq!(
        &words[at..at + 3],
        ["wpimg", "build", "image.yaml"],
        "in: {line}"
    );
    for flag in ["--push", "--ecr", "--json"] {
        assert!(words.contains(&flag), "`{flag}` missing from: {line}");
    }
    let value_of = |flag: &str| -> &str {
        let i = words
            .iter()
            .position(|w| *w == flag)
            .unwrap_or_else(|| panic!("`{flag}` missing from: {line}"));
        words
            .get(i + 1)
            .unwrap_or_else(|| panic!("`{flag}` has no value in: {line}"))
    };
    assert_eq!(value_of("--cache-repo"), "\"$ECR_CACHE_REPO\"");
    assert_eq!(
        value_of("--sign-kms"),
        "\"$SIGNING_KMS_KEY\"",
        "the image is signed with the KMS key: {line}"
    );
    assert_eq!(value_of("--var"), compact(&format!("git_sha={git_sha}")));
    let manifest = value_of("--manifest").to_string();
    assert!(manifest.ends_with(".json"), "manifest file: {manifest}");
    let tee: Vec<&str> = tee.split_whitespace().collect();
    assert_eq!(tee.len(), 2, "expected `| tee FILE`, got: {line}");
    assert_eq!(tee[0], "tee");
    (manifest, tee[1].to_string())
}

fn require_tools() {
    for tool in ["bash", "jq"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "`{tool}` is needed to run the CI job scripts: apt-get install {tool} (or run scripts/setup)");
    }
}

/// Sample stdout of `wpimg build --json`: events, a stray non-JSON line, maybe a result.
fn sample_events(with_result: bool) -> String {
    let mut s = String::from(
        "{\"event\":\"stage\",\"stage\":\"pull\"}\nnot json at all\n{\"event\":\"push\",\"image_uri\":\"wrong\"}\n",
    );
    if with_result {
        s.push_str(&format!(
            "{{\"event\":\"result\",\"reference\":\"{SAMPLE_LOCAL_REF}\",\"image_uri\":\"{SAMPLE_URI}\",\"digest\":\"sha256:9f86\"}}\n"
        ));
    }
    // Only the result event counts, wherever other events carrying image_uri stand.
    s.push_str("{\"event\":\"note\",\"image_uri\":\"not-this-one\"}\n");
    s
}

/// Runs `script` with bash (-e, pipefail, as both CI systems do) in `dir` with `env`.
fn run_bash(dir: &Path, script: &str, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script])
        .current_dir(dir)
        .env_remove("GITHUB_OUTPUT")
        .env_remove("GITHUB_STEP_SUMMARY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("bash runs")
}

#[test]
fn github_workflow_may_request_an_oidc_token_and_nothing_more() {
    let wf = load(GITHUB_WORKFLOW);
    let perms = &wf["permissions"];
    assert_eq!(
        perms["id-token"], "write",
        "OIDC needs permissions.id-token: write"
    );
    assert_eq!(perms["contents"], "read");
    let granted: Vec<_> = perms.as_object().expect("permissions map").keys().collect();
    assert_eq!(
        granted,
        ["id-token", "contents"],
        "no other permission is needed"
    );
    assert!(wf["on"]["push"]["branches"]
        .as_array()
        .is_some_and(|b| b.contains(&"main".into())));
    assert_eq!(
        wf["defaults"]["run"]["shell"], "bash",
        "`shell: bash` runs steps with -eo pipefail, so a failing wpimg is not hidden by tee"
    );
}

#[test]
fn github_workflow_assumes_the_role_before_building() {
    let wf = load(GITHUB_WORKFLOW);
    let steps = github_steps(&wf);
    let (aws_at, aws) = find_step(steps, "configures AWS credentials", |s| {
        s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("aws-actions/configure-aws-credentials@"))
    });
    let role = aws["with"]["role-to-assume"].as_str().unwrap_or("");
    assert!(
        role.contains("vars.AWS_ROLE_ARN"),
        "role-to-assume: {role:?}"
    );
    assert!(aws["with"]["aws-region"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    for key in ["aws-access-key-id", "aws-secret-access-key"] {
        assert!(
            aws["with"].get(key).is_none(),
            "OIDC only: no stored `{key}`"
        );
    }
    let (build_at, _) = find_step(steps, "runs wpimg build", |s| {
        run_of(s).contains("wpimg build")
    });
    let (install_at, install) = find_step(steps, "installs wpimg", |s| {
        run_of(s).contains("cargo install")
    });
    assert!(
        run_of(install).contains("--path ."),
        "wpimg is installed from this checkout"
    );
    let (checkout_at, _) = find_step(steps, "checks out", |s| {
        s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("actions/checkout@"))
    });
    assert!(checkout_at < install_at && install_at < build_at && aws_at < build_at);
}

#[test]
fn github_workflow_builds_pushes_and_publishes_the_image_uri() {
    let wf = load(GITHUB_WORKFLOW);
    let steps = github_steps(&wf);
    let (build_at, build) = find_step(steps, "runs wpimg build", |s| {
        run_of(s).contains("wpimg build")
    });
    let (manifest, events) =
        check_build_command(wpimg_build_line(run_of(build)), "${{ github.sha }}");
    assert_eq!(build["env"]["ECR_CACHE_REPO"], "${{ vars.ECR_CACHE_REPO }}");

    let (uri_at, uri) = find_step(steps, "extracts the image URI", |s| {
        run_of(s).contains("select(.event==\"result\")") && run_of(s).contains("image_uri=")
    });
    assert!(uri_at > build_at);
    assert!(run_of(uri).contains(&events), "the URI step reads {events}");
    let id = uri["id"].as_str().expect("the URI step has an id");
    assert_eq!(
        wf["jobs"]["image"]["outputs"]["image_uri"],
        format!("${{{{ steps.{id}.outputs.image_uri }}}}")
    );

    let (upload_at, upload) = find_step(steps, "uploads the build manifest", |s| {
        s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("actions/upload-artifact@"))
            && s["with"]["name"] == "build-manifest"
    });
    assert!(upload_at > build_at);
    assert_eq!(
        upload["with"]["path"],
        manifest.as_str(),
        "the artifact is the file given to --manifest"
    );
    assert_eq!(upload["with"]["if-no-files-found"], "error");
}

#[test]
fn github_image_uri_step_writes_output_and_summary() {
    require_tools();
    let wf = load(GITHUB_WORKFLOW);
    let steps = github_steps(&wf);
    let (_, build) = find_step(steps, "runs wpimg build", |s| {
        run_of(s).contains("wpimg build")
    });
    let (_, events) = check_build_command(wpimg_build_line(run_of(build)), "${{ github.sha }}");
    let (_, uri) = find_step(steps, "extracts the image URI", |s| {
        run_of(s).contains("select(.event==\"result\")") && run_of(s).contains("image_uri=")
    });
    let script = run_of(uri);
    assert!(
        !script.contains("${{"),
        "the URI step must not splice expressions into shell"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("github_output");
    let summary = dir.path().join("step_summary");
    std::fs::write(dir.path().join(&events), sample_events(true)).unwrap();
    let env = [
        ("GITHUB_OUTPUT", out.as_path()),
        ("GITHUB_STEP_SUMMARY", summary.as_path()),
    ];
    let res = run_bash(dir.path(), script, &env);
    assert!(
        res.status.success(),
        "URI step failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!("image_uri={SAMPLE_URI}\n")
    );
    assert!(std::fs::read_to_string(&summary)
        .unwrap()
        .contains(SAMPLE_URI));

    std::fs::write(dir.path().join(&events), sample_events(false)).unwrap();
    std::fs::remove_file(&out).unwrap();
    let res = run_bash(dir.path(), script, &env);
    assert!(
        !res.status.success(),
        "without a result event the step must fail"
    );
    assert!(
        !out.exists(),
        "no output may be written without a result event"
    );
}

fn gitlab_job(ci: &Value) -> &Value {
    let job = &ci["build-image"];
    assert!(
        job.is_object(),
        "{GITLAB_CI} must define the job build-image"
    );
    job
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} must be a list"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("{what} items are strings"))
                .to_string()
        })
        .collect()
}

#[test]
fn gitlab_job_authenticates_with_an_oidc_id_token() {
    let ci = load(GITLAB_CI);
    let job = gitlab_job(&ci);
    let tokens = job["id_tokens"].as_object().expect("id_tokens map");
    assert_eq!(tokens.len(), 1);
    let (name, token) = tokens.iter().next().unwrap();
    assert_eq!(token["aud"], "sts.amazonaws.com");
    let before = strings(&job["before_script"], "before_script").join("\n");
    assert!(
        before.contains("export AWS_WEB_IDENTITY_TOKEN_FILE="),
        "{before}"
    );
    assert!(
        before.contains(&format!("\"${name}\" > \"$AWS_WEB_IDENTITY_TOKEN_FILE\"")),
        "the ID token {name} is written to AWS_WEB_IDENTITY_TOKEN_FILE"
    );
    assert!(
        before.contains("$AWS_ROLE_ARN"),
        "the job checks that AWS_ROLE_ARN is set"
    );
    assert!(
        before.contains("cargo install --locked --path ."),
        "{before}"
    );
    for secret in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            !serde_json::to_string(job).unwrap().contains(secret),
            "OIDC only: no {secret}"
        );
    }
    assert!(job["variables"]["DOCKER_HOST"]
        .as_str()
        .is_some_and(|h| h.starts_with("tcp://")));
    let services = serde_json::to_string(&job["services"]).unwrap();
    assert!(
        services.contains("dind"),
        "the job needs a Docker engine: {services}"
    );
}

#[test]
fn gitlab_job_builds_pushes_and_reports_the_image_uri() {
    let ci = load(GITLAB_CI);
    let job = gitlab_job(&ci);
    let script = strings(&job["script"], "script");
    let build_at = script
        .iter()
        .position(|l| l.contains("wpimg build"))
        .expect("script runs wpimg build");
    assert!(
        script[build_at].starts_with("set -o pipefail;"),
        "tee must not hide a failing wpimg"
    );
    let (manifest, events) = check_build_command(&script[build_at], "$CI_COMMIT_SHA");
    assert!(script[build_at + 1..].iter().any(|l| l.contains(&events)));

    let artifacts = &job["artifacts"];
    assert!(strings(&artifacts["paths"], "artifacts.paths").contains(&manifest));
    let dotenv = artifacts["reports"]["dotenv"]
        .as_str()
        .expect("artifacts.reports.dotenv");
    assert!(
        script
            .iter()
            .any(|l| l.contains(&format!("\"IMAGE_URI=$IMAGE_URI\" > {dotenv}"))),
        "the script writes IMAGE_URI into {dotenv}"
    );
}

#[test]
fn gitlab_script_writes_the_dotenv_report() {
    require_tools();
    let ci = load(GITLAB_CI);
    let job = gitlab_job(&ci);
    let script = strings(&job["script"], "script");
    let build_at = script
        .iter()
        .position(|l| l.contains("wpimg build"))
        .unwrap();
    let (_, events) = check_build_command(&script[build_at], "$CI_COMMIT_SHA");
    let dotenv = job["artifacts"]["reports"]["dotenv"].as_str().unwrap();
    // The lines up to the one writing the report (the ones after it need AWS).
    let report_at = script
        .iter()
        .position(|l| l.contains(&format!("> {dotenv}")))
        .unwrap();
    let after = script[build_at + 1..=report_at].join("\n");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(&events), sample_events(true)).unwrap();
    let res = run_bash(dir.path(), &after, &[]);
    assert!(
        res.status.success(),
        "script failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let env = std::fs::read_to_string(dir.path().join(dotenv)).unwrap();
    assert_eq!(env, format!("IMAGE_URI={SAMPLE_URI}\n"));

    std::fs::remove_file(dir.path().join(dotenv)).unwrap();
    std::fs::write(dir.path().join(&events), sample_events(false)).unwrap();
    let res = run_bash(dir.path(), &after, &[]);
    assert!(
        !res.status.success(),
        "without a result event the job must fail"
    );
    assert!(!dir.path().join(dotenv).exists());
}

/// The files a script writes with `wpimg sbom REF --format FORMAT > FILE`, by format; checks
/// that REF is the local reference read from the events file.
fn sbom_files(script: &str, local_ref_var: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in script.lines().filter(|l| l.contains("wpimg sbom")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "wpimg").unwrap();
        assert_eq!(words[at + 1], "sbom", "{line}");
        assert_eq!(words[at + 2], format!("\"${local_ref_var}\""), "{line}");
        let format = words[words.iter().position(|w| *w == "--format").unwrap() + 1];
        let file = words[words.iter().position(|w| *w == ">").unwrap() + 1];
        out.push((format.to_string(), file.to_string()));
    }
    out.sort();
    out
}

/// Run the line of `script` that sets `var` from the events file, against sample events.
fn extracted(script: &str, var: &str, events: &str) -> String {
    let line = script
        .lines()
        .map(|l| l.trim().trim_start_matches("- "))
        .find(|l| l.starts_with(&format!("{var}=")))
        .unwrap_or_else(|| panic!("no `{var}=` line in:\n{script}"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(events), sample_events(true)).unwrap();
    let res = run_bash(dir.path(), &format!("{line}\nprintf %s \"${var}\""), &[]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    String::from_utf8(res.stdout).unwrap()
}

#[test]
fn github_workflow_signs_with_kms_verifies_and_keeps_the_sbom() {
    require_tools();
    let wf = load(GITHUB_WORKFLOW);
    let steps = github_steps(&wf);
    let (build_at, build) = find_step(steps, "runs wpimg build", |s| {
        run_of(s).contains("wpimg build")
    });
    assert_eq!(
        build["env"]["SIGNING_KMS_KEY"],
        "${{ vars.SIGNING_KMS_KEY }}"
    );
    let (_, events) = check_build_command(wpimg_build_line(run_of(build)), "${{ github.sha }}");
    let (uri_at, uri) = find_step(steps, "extracts the image URI", |s| {
        run_of(s).contains("select(.event==\"result\")") && run_of(s).contains("image_uri=")
    });
    let id = uri["id"].as_str().unwrap();
    let (check_at, check) = find_step(steps, "verifies and exports the SBOM", |s| {
        run_of(s).contains("wpimg verify")
    });
    assert!(build_at < uri_at && uri_at < check_at);
    assert_eq!(
        check["env"]["IMAGE_URI"],
        format!("${{{{ steps.{id}.outputs.image_uri }}}}")
    );
    assert_eq!(
        check["env"]["SIGNING_KMS_KEY"],
        "${{ vars.SIGNING_KMS_KEY }}"
    );
    let script = run_of(check);
    assert!(!script.contains("${{"), "no expressions spliced into shell");
    assert!(
        script.contains("wpimg verify \"$IMAGE_URI\" --kms \"$SIGNING_KMS_KEY\""),
        "{script}"
    );
    assert_eq!(extracted(script, "local_ref", &events), SAMPLE_LOCAL_REF);
    let files = sbom_files(script, "local_ref");
    let formats: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(formats, ["cyclonedx-json", "spdx-json"]);

    let (upload_at, upload) = find_step(steps, "uploads the SBOM", |s| {
        s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("actions/upload-artifact@"))
            && s["with"]["name"] == "sbom"
    });
    assert!(upload_at > check_at);
    let paths: Vec<&str> = upload["with"]["path"].as_str().unwrap().lines().collect();
    for (_, file) in &files {
        assert!(
            paths.contains(&file.as_str()),
            "{file} not uploaded: {paths:?}"
        );
    }
    assert_eq!(upload["with"]["if-no-files-found"], "error");
}

#[test]
fn gitlab_job_signs_with_kms_verifies_and_keeps_the_sbom() {
    require_tools();
    let ci = load(GITLAB_CI);
    let job = gitlab_job(&ci);
    let script = strings(&job["script"], "script");
    let build_at = script
        .iter()
        .position(|l| l.contains("wpimg build"))
        .unwrap();
    let (_, events) = check_build_command(&script[build_at], "$CI_COMMIT_SHA");
    let verify_at = script
        .iter()
        .position(|l| l.contains("wpimg verify"))
        .expect("the job runs wpimg verify");
    let uri_at = script
        .iter()
        .position(|l| l.starts_with("IMAGE_URI="))
        .unwrap();
    assert!(uri_at < verify_at);
    assert_eq!(
        script[verify_at],
        "wpimg verify \"$IMAGE_URI\" --kms \"$SIGNING_KMS_KEY\""
    );
    let rest = script[verify_at..].join("\n");
    assert_eq!(extracted(&rest, "LOCAL_REF", &events), SAMPLE_LOCAL_REF);
    let files = sbom_files(&rest, "LOCAL_REF");
    let formats: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(formats, ["cyclonedx-json", "spdx-json"]);
    let paths = strings(&job["artifacts"]["paths"], "artifacts.paths");
    for (_, file) in &files {
        assert!(paths.contains(file), "{file} is not an artifact: {paths:?}");
    }
    assert_eq!(job["artifacts"]["when"], "on_success");
}
