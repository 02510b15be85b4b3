use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

fn load_str(text: &str) -> (tempfile::TempDir, Result<ImageSpec, SpecError>) {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "pb.yml", "- hosts: all\n  tasks: []\n");
    let p = write(d.path(), "image.yaml", text);
    let r = load(&p, &Overrides::default());
    (d, r)
}

const MINIMAL: &str =
    "name: app\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: pb.yml\n";

#[test]
fn minimal_spec_loads_with_defaults() {
    let (_d, r) = load_str(MINIMAL);
    let s = r.unwrap();
    assert_eq!(s.local_ref(), "app:latest");
    assert_eq!(s.layer_settings().compression(), Compression::Gzip);
    assert!(s.target.is_none());
    let pb = s.provision.playbook.unwrap();
    assert!(pb.is_absolute() || pb.ends_with("pb.yml"));
}

#[test]
fn every_problem_is_reported_with_lines() {
    let (_d, r) = load_str(
        "name: app\nbase: ${nope}\nprovision:\n  playbook: missing.yml\n  colour: red\nimage:\n  expose: [99999]\n",
    );
    let e = r.unwrap_err();
    let ps = e.problems();
    assert_eq!(ps.len(), 4, "{e}");
    assert_eq!((ps[0].line, ps[0].key.as_str()), (2, "base"));
    assert!(ps[0].message.contains("undefined variable ${nope}"));
    assert_eq!((ps[1].line, ps[1].key.as_str()), (4, "provision.playbook"));
    assert_eq!((ps[2].line, ps[2].key.as_str()), (5, "provision.colour"));
    assert!(ps[2].message.contains("unknown key"));
    assert_eq!((ps[3].line, ps[3].key.as_str()), (7, "image.expose[0]"));
    assert!(
        e.to_string().contains("image.yaml:5:3: provision.colour"),
        "{e}"
    );
}

#[test]
fn wrong_types_and_missing_required() {
    let (_d, r) = load_str("name: [a]\nprovision: {}\n");
    let e = r.unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains(":1:") && s.contains("name: expected a string, got a list"),
        "{s}"
    );
    assert!(s.contains("base: required key \"base\" is missing"), "{s}");
    assert!(s.contains("provision.playbook: required key"), "{s}");
}

#[test]
fn lists_and_mappings_say_what_they_hold() {
    let (_d, r) = load_str(&format!(
        "{MINIMAL}image:\n  cmd: /bin/true\n  expose: 80\n  labels: [a]\n"
    ));
    let s = r.unwrap_err().to_string();
    assert!(
        s.contains("image.cmd: expected a list of strings, got a string"),
        "{s}"
    );
    assert!(
        s.contains("image.expose: expected a list of ports, got an integer"),
        "{s}"
    );
    assert!(
        s.contains("image.labels: expected a mapping, got a list"),
        "{s}"
    );
}

#[test]
fn integers_are_range_checked_before_narrowing() {
    let (_d, r) = load_str(&format!("{MINIMAL}layer:\n  level: 4294967302\n"));
    let e = r.unwrap_err();
    let p = &e.problems()[0];
    assert_eq!((p.line, p.key.as_str()), (6, "layer.level"), "{e}");
    assert!(p.message.contains("out of range"), "{e}");
    let (_d, r) = load_str(&format!("{MINIMAL}layer:\n  level: 4294967296\n"));
    assert!(r.is_err(), "4294967296 must not wrap to 0");
    let (_d, r) = load_str(&format!(
        "{MINIMAL}layer:\n  compression: zstd\n  level: 19\n"
    ));
    assert_eq!(r.unwrap().layer_settings().level, Some(19));
    let (_d, r) = load_str(&format!("{MINIMAL}layer:\n  level: 12\n"));
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("out of range 0..=9 for gzip"));
}

#[test]
fn duplicate_keys_and_bad_values_are_problems() {
    let (_d, r) = load_str(&format!(
        "{MINIMAL}layer:\n  compression: brotli\nimage:\n  env: {{ \"A=B\": x }}\n  stop_signal: SIGNOPE\n"
    ));
    let s = r.unwrap_err().to_string();
    assert!(
        s.contains("layer.compression: unknown value \"brotli\""),
        "{s}"
    );
    assert!(
        s.contains("image.env.A=B: invalid environment variable name"),
        "{s}"
    );
    assert!(s.contains("image.stop_signal: unknown signal"), "{s}");
    let (_d, r) = load_str(&format!("{MINIMAL}  extra_vars: {{ a: 1, a: 2 }}\n"));
    assert!(r.is_err(), "a repeated key must not pass silently");
}

#[test]
fn variables_defaults_overrides_and_env() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "pb.yml", "- hosts: all\n");
    let p = write(
        d.path(),
        "image.yaml",
        "name: app\nvariables: { tag: v1, reg: \"127.0.0.1:5000\" }\nbase: ${reg}/debian:${flavour:-bookworm}\nprovision: { playbook: pb.yml, extra_vars: { t: \"${tag}\", n: [1, \"$${lit}\"] } }\ntarget: { repository: \"${reg}/app\", tags: [\"${tag}\"] }\n",
    );
    let vf = write(d.path(), "vars.yml", "tag: v2\n");
    let ov = Overrides {
        vars: vec![("flavour".into(), "trixie".into())],
        var_files: vec![vf],
    };
    let s = load(&p, &ov).unwrap();
    assert_eq!(s.base, "127.0.0.1:5000/debian:trixie");
    assert_eq!(s.local_ref(), "app:v2");
    let ev = s.provision.extra_vars.as_ref().unwrap();
    assert_eq!(ev["t"], "v2");
    assert_eq!(ev["n"][1], "${lit}");
}

#[test]
fn values_from_the_environment_or_a_var_file_are_redacted() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "pb.yml", "- hosts: all\n");
    // A variable every test process has (setting one would race other tests' reads).
    let from_env = std::env::var("PATH").unwrap();
    let p = write(
        d.path(),
        "image.yaml",
        "name: app\nbase: 127.0.0.1:5000/debian:bookworm\nvariables:\n  db_pass: ${PATH}\n  plain: shown\nprovision:\n  playbook: pb.yml\n  extra_vars: { db_password: \"${db_pass}\", api: \"${api_token}\", who: \"${plain}\" }\n  env: { TOKEN: \"${api_token}\" }\n",
    );
    let vf = write(d.path(), "secrets.yml", "api_token: tok-from-file\n");
    let ov = Overrides {
        vars: vec![("cli".into(), "from-flag".into())],
        var_files: vec![vf],
    };
    let s = load(&p, &ov).unwrap();
    let json = s.redacted_json();
    let text = json.to_string();
    for secret in [from_env.as_str(), "tok-from-file"] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    assert_eq!(json["provision"]["extra_vars"]["db_password"], REDACTED);
    assert_eq!(json["provision"]["extra_vars"]["api"], REDACTED);
    assert_eq!(json["provision"]["env"]["TOKEN"], REDACTED);
    assert_eq!(json["variables"]["db_pass"], REDACTED);
    assert_eq!(json["variables"]["api_token"], REDACTED);
    // Values from image.yaml itself or --var stay visible.
    assert_eq!(json["provision"]["extra_vars"]["who"], "shown");
    assert_eq!(json["variables"]["plain"], "shown");
    assert_eq!(json["variables"]["cli"], "from-flag");
    // The build still gets the real values.
    assert_eq!(
        s.provision.extra_vars.as_ref().unwrap()["db_password"],
        from_env.as_str()
    );
    assert_eq!(s.shown(&KeyPath::of("base"), &s.base), s.base);
    let pw = KeyPath::of("provision.extra_vars.db_password");
    assert_eq!(s.shown(&pw, &from_env), REDACTED);
}

#[test]
fn problems_do_not_quote_secret_values() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "pb.yml", "- hosts: all\n");
    let vf = write(d.path(), "v.yml", "tag: \"s3cret tag!\"\n");
    let p = write(
        d.path(),
        "image.yaml",
        &format!("{MINIMAL}target:\n  repository: 127.0.0.1:5000/app\n  tags: [\"${{tag}}\"]\n"),
    );
    let ov = Overrides {
        vars: vec![],
        var_files: vec![vf],
    };
    let e = load(&p, &ov).unwrap_err().to_string();
    assert!(e.contains("target.tags[0]: invalid tag <redacted>"), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
}

#[test]
fn yaml_syntax_error_has_location() {
    let (_d, r) = load_str("name: app\nbase: [unclosed\n");
    let e = r.unwrap_err();
    assert!(e.problems()[0].line >= 2, "{e}");
    assert!(e.to_string().contains("invalid YAML"), "{e}");
}

#[test]
fn not_a_mapping_is_one_problem() {
    let (_d, r) = load_str("- a\n- b\n");
    let e = r.unwrap_err();
    assert_eq!(e.problems().len(), 1, "{e}");
    assert!(
        e.to_string().contains("expected a mapping, got a list"),
        "{e}"
    );
}

#[test]
fn json_schema_describes_every_key() {
    let schema = json_schema();
    let props = &schema["properties"];
    for k in [
        "name",
        "base",
        "platform",
        "variables",
        "provision",
        "image",
        "layer",
        "target",
    ] {
        assert!(props.get(k).is_some(), "{k} missing from {schema}");
    }
    assert!(props.get("source").is_none());
    assert_eq!(
        schema["required"],
        serde_json::json!(["name", "base", "provision"])
    );
    assert_eq!(schema["additionalProperties"], false);
    let text = schema.to_string();
    assert!(text.contains("Required: the playbook"), "{text}");
    assert!(
        text.contains("\"gzip\"") && text.contains("\"zstd\""),
        "{text}"
    );
    assert!(text.contains("draft-07"), "{text}");
}

#[test]
fn sbom_is_on_by_default_off_with_false_and_takes_a_format() {
    use crate::sbom::Format;
    let (_d, r) = load_str(MINIMAL);
    assert_eq!(r.unwrap().sbom_format(), Some(Format::SpdxJson));
    let (_d, r) = load_str(&format!("{MINIMAL}sbom: false\n"));
    let s = r.unwrap();
    assert_eq!(s.sbom_format(), None);
    assert_eq!(s.redacted_json()["sbom"], false);
    let (_d, r) = load_str(&format!("{MINIMAL}sbom: true\n"));
    assert_eq!(r.unwrap().sbom_format(), Some(Format::SpdxJson));
    let (_d, r) = load_str(&format!("{MINIMAL}sbom:\n  format: cyclonedx-json\n"));
    let s = r.unwrap();
    assert_eq!(s.sbom_format(), Some(Format::CycloneDxJson));
    assert_eq!(
        s.redacted_json()["sbom"],
        serde_json::json!({"format": "cyclonedx-json"})
    );
    let (_d, r) = load_str(&format!(
        "variables: {{ s: \"false\" }}\n{MINIMAL}sbom: ${{s}}\n"
    ));
    assert_eq!(r.unwrap().sbom_format(), None);
}

#[test]
fn sbom_mistakes_are_located_and_reported_with_the_others() {
    let (_d, r) = load_str(&format!(
        "{MINIMAL}sbom:\n  format: spdx\n  formt: x\nimage:\n  expose: [0]\n"
    ));
    let e = r.unwrap_err();
    let ps = e.problems();
    assert_eq!(ps.len(), 3, "{e}");
    assert_eq!((ps[0].line, ps[0].key.as_str()), (6, "sbom.format"));
    assert!(ps[0].message.contains("spdx-json, cyclonedx-json"), "{e}");
    assert_eq!((ps[1].line, ps[1].key.as_str()), (7, "sbom.formt"));
    assert!(ps[1].message.contains("unknown key \"formt\""), "{e}");
    assert_eq!(ps[2].key, "image.expose[0]");
    let (_d, r) = load_str(&format!("{MINIMAL}sbom: [spdx-json]\n"));
    let e = r.unwrap_err();
    assert_eq!(e.problems().len(), 1, "{e}");
    assert_eq!(
        (e.problems()[0].line, e.problems()[0].key.as_str()),
        (5, "sbom")
    );
    assert!(
        e.to_string().contains("expected false, true or a mapping"),
        "{e}"
    );
    let (_d, r) = load_str(&format!("{MINIMAL}sbom: maybe\n"));
    assert!(r.unwrap_err().to_string().contains("got \"maybe\""));
    assert!(json_schema()["properties"].get("sbom").is_some());
}

#[test]
fn ecr_tag_immutability_with_exclusions() {
    let ecr = |yaml: &str| {
        format!(
            "{MINIMAL}target:\n  repository: 123456789012.dkr.ecr.us-east-1.amazonaws.com/app\n  ecr:\n{yaml}"
        )
    };
    let (_d, r) = load_str(&ecr("    tag_immutability: IMMUTABLE_WITH_EXCLUSION\n"));
    let s = r.unwrap();
    let e = s.target.unwrap().ecr.unwrap();
    assert_eq!(e.exclusion_filters(), ["sha256-*"]);
    let (_d, r) = load_str(&ecr(
        "    tag_immutability: IMMUTABLE_WITH_EXCLUSION\n    tag_immutability_exclusion_filters: [\"sha256-*\", \"dev-*\"]\n",
    ));
    let e = r.unwrap().target.unwrap().ecr.unwrap();
    assert_eq!(e.exclusion_filters(), ["sha256-*", "dev-*"]);
    let (_d, r) = load_str(&ecr("    tag_immutability: IMMUTABLE\n"));
    assert!(r
        .unwrap()
        .target
        .unwrap()
        .ecr
        .unwrap()
        .exclusion_filters()
        .is_empty());
    let (_d, r) = load_str(&ecr(
        "    tag_immutability: IMMUTABLE\n    tag_immutability_exclusion_filters: [\"sha256-*\"]\n",
    ));
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("target.ecr.tag_immutability_exclusion_filters: exclusion filters need"),
        "{e}"
    );
    let (_d, r) = load_str(&ecr(
        "    tag_immutability: MUTABLE_WITH_EXCLUSION\n    tag_immutability_exclusion_filters: [\"a b\"]\n",
    ));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("tag_immutability_exclusion_filters[0]"), "{e}");
    let (_d, r) = load_str(&ecr("    tag_immutability: SOMETIMES\n"));
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("IMMUTABLE_WITH_EXCLUSION"));
}

const STEPS: &str = "name: app\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  env: { A: \"1\" }\n  cache_mounts: [/var/cache/apt/archives/, /var/lib/apt/lists]\n  steps:\n    - name: os\n      playbook: pb.yml\n      inputs: [\"files/**\"]\n    - name: app-2\n      playbook: pb.yml\n      env: { B: \"2\" }\nlayer:\n  squash: true\n";

#[test]
fn steps_load_with_their_settings() {
    let (_d, r) = load_str(STEPS);
    let s = r.unwrap();
    let steps = s.provision.steps.as_ref().unwrap();
    assert_eq!(steps.len(), 2);
    assert!(steps[0].playbook.ends_with("pb.yml") && steps[0].playbook.is_file());
    assert_eq!(
        s.provision.cache_mounts.as_deref().unwrap(),
        ["/var/cache/apt/archives", "/var/lib/apt/lists"],
        "normalised"
    );
    assert!(s.layer_settings().squashed());
}

#[test]
fn steps_problems_are_reported_with_lines() {
    let (_d, r) = load_str(
        "name: app\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: pb.yml\n  steps:\n    - name: os\n      playbook: pb.yml\n",
    );
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("image.yaml:6:5: provision.steps: playbook and steps together"),
        "{e}"
    );

    let (_d, r) = load_str(
        "name: app\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  extra_vars: { a: 1 }\n  cache_mounts: [relative, /x, /x, /]\n  steps:\n    - name: OS\n      playbook: missing.yml\n      inputs: [/etc/passwd, \"../up/*\"]\n    - name: app\n      playbook: pb.yml\n    - name: app\n      playbook: pb.yml\n",
    );
    let e = r.unwrap_err().to_string();
    for want in [
        "image.yaml:4:",
        "provision.cache_mounts[0]: cache mount \"relative\" must be an absolute path",
        "provision.cache_mounts[2]: cache mount \"/x\" is listed twice",
        "provision.cache_mounts[3]: cache mount \"/\" must be an absolute path",
        "image.yaml:7:13: provision.steps[0].name: invalid step name \"OS\"",
        "provision.steps[0].playbook: playbook \"missing.yml\" not found",
        "provision.steps[0].inputs[0]: pattern \"/etc/passwd\": must be relative",
        "provision.steps[0].inputs[1]: pattern \"../up/*\": must be relative",
        "provision.steps[2].name: step name \"app\" is used twice",
    ] {
        assert!(e.contains(want), "{want:?} not in:\n{e}");
    }

    let (_d, r) =
        load_str("name: app\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  env: {}\n");
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("image.yaml:4:3: provision.playbook: required key"),
        "{e}"
    );
}

#[test]
fn platforms_list_builds_an_index() {
    let (_d, r) = load_str(&format!(
        "{MINIMAL}platforms: [linux/amd64, linux/arm64, linux/arm/v7]\n"
    ));
    let s = r.unwrap();
    let p: Vec<String> = s
        .index_platforms()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(p, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    let (_d, r) = load_str(MINIMAL);
    assert!(r.unwrap().index_platforms().is_none());
    assert!(json_schema()["properties"].get("platforms").is_some());
}

#[test]
fn platforms_are_checked_with_their_lines() {
    let (_d, r) = load_str(&format!(
        "{MINIMAL}platform: linux/amd64\nplatforms:\n  - linux/amd64\n  - linux\n  - Linux/ARM64\n  - linux/amd64\n"
    ));
    let e = r.unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("image.yaml:7:3: platforms: platform and platforms are mutually exclusive"),
        "{s}"
    );
    assert!(
        s.contains(
            "image.yaml:8:5: platforms[1]: invalid platform \"linux\": expected os/arch[/variant]"
        ),
        "{s}"
    );
    assert!(
        s.contains(":9:5: platforms[2]: invalid platform \"Linux/ARM64\""),
        "{s}"
    );
    assert!(
        s.contains(":10:5: platforms[3]: platform \"linux/amd64\" is listed twice"),
        "{s}"
    );
    assert_eq!(e.problems().len(), 4, "{s}");
    let (_d, r) = load_str(&format!("{MINIMAL}platforms: []\n"));
    let s = r.unwrap_err().to_string();
    assert!(
        s.contains("platforms: at least one platform is needed"),
        "{s}"
    );
    let (_d, r) = load_str(&format!("{MINIMAL}platform: linux/amd64/\n"));
    let s = r.unwrap_err().to_string();
    assert!(s.contains(":5:11: platform: invalid platform"), "{s}");
}

#[test]
fn accelerator_is_none_unless_set_and_mitogen_refuses_docker_api() {
    let (_d, r) = load_str(MINIMAL);
    assert_eq!(r.unwrap().provision.accelerator(), Accelerator::None);
    let (_d, r) = load_str(&format!(
        "{MINIMAL}  accelerator: mitogen\n  mitogen_path: vendor/mitogen\n"
    ));
    let s = r.unwrap();
    assert_eq!(s.provision.accelerator(), Accelerator::Mitogen);
    // Kept as written (resolved against image.yaml when Mitogen is looked for).
    assert_eq!(
        s.provision.mitogen_path.as_deref(),
        Some(Path::new("vendor/mitogen"))
    );
    let (_d, r) = load_str(&format!("{MINIMAL}  accelerator: turbo\n"));
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains(":5:") && e.contains("provision.accelerator"),
        "{e}"
    );
    let (_d, r) = load_str(&format!(
        "{MINIMAL}  accelerator: mitogen\n  connection: community.docker.docker_api\n"
    ));
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("image.yaml:6:") && e.contains("cannot be accelerated"),
        "{e}"
    );
    let (_d, r) = load_str(&format!(
        "{MINIMAL}  accelerator: mitogen\n  connection: community.docker.docker\n"
    ));
    assert!(r.is_ok());
    let schema = json_schema().to_string();
    assert!(
        schema.contains("mitogen") && schema.contains("mitogen_path"),
        "{schema}"
    );
}

#[test]
fn outputs_are_placeholders_in_labels_env_and_tags() {
    let (_d, r) = load_str(&format!(
        "{MINIMAL}variables:\n  v: x\nimage:\n  labels:\n    version: ${{outputs.wp}}\n    both: ${{v}}-${{outputs.wp:-none}}-$${{lit}}\n    plain: $${{lit}}\n  env:\n    WP: ${{outputs.wp}}\ntarget:\n  repository: 127.0.0.1:5000/app\n  tags: [\"${{outputs.wp}}\", latest, \"v${{outputs.wp}}\"]\n"
    ));
    let s = r.unwrap();
    let labels = s.image.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels["version"], "${outputs.wp}");
    assert_eq!(labels["both"], "x-${outputs.wp:-none}-$${lit}");
    assert_eq!(labels["plain"], "${lit}");
    let templates: Vec<String> = s.source.outputs.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        templates,
        [
            "image.env.WP",
            "image.labels.both",
            "image.labels.version",
            "target.tags[0]",
            "target.tags[2]"
        ]
    );
    // The local tag is the first one known before the build.
    assert_eq!(s.local_ref(), "app:latest");
    let json = s.redacted_json();
    assert_eq!(json["image"]["labels"]["version"], "${outputs.wp}");
    assert_eq!(json["target"]["tags"][0], "${outputs.wp}");

    let outputs = crate::outputs::Outputs::from([("wp".to_string(), "6.1.9".to_string())]);
    let resolved = crate::outputs::resolve_settings(&s, &outputs).unwrap();
    let labels = resolved.labels.unwrap();
    assert_eq!(labels["version"], "6.1.9");
    assert_eq!(labels["both"], "x-6.1.9-${lit}");
    assert_eq!(labels["plain"], "${lit}");
    assert_eq!(resolved.env.unwrap()["WP"], "6.1.9");
    let e = crate::outputs::resolve_settings(&s, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("no step reported \"wp\""), "{e}");
}

#[test]
fn outputs_anywhere_else_are_located_problems() {
    let (_d, r) = load_str(
        "name: app\nbase: 127.0.0.1:5000/debian:${outputs.tag}\nvariables:\n  v: ${outputs.a}\nprovision:\n  playbook: pb.yml\n  extra_vars:\n    x: ${outputs.b}\nimage:\n  workdir: /${outputs.c}\n  labels:\n    ok: ${outputs.d}\n    bad: ${outputs.no-dash}\ntarget:\n  repository: 127.0.0.1:5000/app\n  tags: [\"-${outputs.e}\", \"${outputs.f:-${v}}\"]\n",
    );
    let e = r.unwrap_err();
    let found: Vec<(u64, &str)> = e
        .problems()
        .iter()
        .map(|p| (p.line, p.key.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (2, "base"),
            (4, "variables.v"),
            (8, "provision.extra_vars.x"),
            (10, "image.workdir"),
            (13, "image.labels.bad"),
            (16, "target.tags[0]"),
            (16, "target.tags[1]"),
        ],
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("image.yaml:2:7: base: ${outputs.NAME} (a provisioning output) may be used only in the values of image.labels, image.env and target.tags"),
        "{msg}"
    );
    assert!(msg.contains("invalid output name \"no-dash\""), "{msg}");
    assert!(msg.contains("invalid tag \"-${outputs.e}\""), "{msg}");
}
