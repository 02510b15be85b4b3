//! Issue 14 in the product: the SBOM stage of `wpimg build` and the `sbom:` key, `wpimg sbom`
//! (layout or registry, stored or made from the layers), signing on `wpimg push` and
//! `build --push` with a file key or an AWS KMS key (moto), attachments as OCI 1.1 referrers (a
//! test proxy answering the referrers API) or under cosign's tags (Debian's docker-registry has
//! no referrers API), ECR's immutable tags refused before any upload, `wpimg verify` agreeing
//! with independent tools (skopeo, curl, openssl), and no key material or password in any
//! output, argument or pushed blob.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::ecr::{Moto, MOTO_ACCOUNT, VENV_PYTHON};
use crate::common::registry::{
    echo_image, write_image_for, KnownRepositories, Proxy, ProxyMode, Registry, RegistryOptions,
};
use crate::common::*;
use crate::sbom::{assert_cyclonedx_valid, assert_spdx_valid, dpkg_query, spdx_set};
use crate::sign::{moto_kms_key, openssl_key, ToolVerifier};
use wpimg::layout::Layout;

/// The package of the Debian base the test play purges.
const PURGED: &str = "tzdata";
const SPDX: &str = "application/spdx+json";
const COSIGN_SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// A project whose play purges [`PURGED`] and adds a file, named `name`, with three image.yaml
/// files: `image.yaml` (SBOM on by default), `cdx.yaml` (`sbom: { format: cyclonedx-json }`,
/// image `NAME-cdx`) and `nosbom.yaml` (`sbom: false`, image `NAME-nosbom`); tag `v1`.
fn write_project(dir: &Path, name: &str) {
    write(
        &dir.join("purge.yml"),
        &format!(
            "- hosts: all\n  gather_facts: false\n  tasks:\n    - name: Purge {PURGED}\n      \
             ansible.builtin.command: dpkg --purge {PURGED}\n      changed_when: true\n    - name: \
             Add a file\n      ansible.builtin.copy:\n        dest: /opt/supply.txt\n        \
             content: \"supply\\n\"\n        mode: \"0644\"\n"
        ),
    );
    let yaml = |name: &str, extra: &str| {
        format!(
            "name: {name}\nbase: {BASE}\nprovision:\n  playbook: purge.yml\ntarget:\n  \
             repository: 127.0.0.1:5000/unused\n  tags: [v1]\n{extra}"
        )
    };
    write(&dir.join("image.yaml"), &yaml(name, ""));
    write(
        &dir.join("cdx.yaml"),
        &yaml(&format!("{name}-cdx"), "sbom:\n  format: cyclonedx-json\n"),
    );
    write(
        &dir.join("nosbom.yaml"),
        &yaml(&format!("{name}-nosbom"), "sbom: false\n"),
    );
}

/// The last JSON line of a successful `--json` command.
fn json_ok(o: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "failed: {}\n{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    let last = stdout.lines().last().expect("no JSON output");
    let v: Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["event"], "result", "{stdout}");
    v
}

/// `wpimg build --json ARGS` in `dir`.
fn build(dir: &Path, args: &[&str]) -> Value {
    json_ok(&run(wpimg()
        .current_dir(dir)
        .args(["build", "--json"])
        .args(args)))
}

fn stage_names(r: &Value) -> Vec<String> {
    r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap().to_string())
        .collect()
}

/// The entries of a layout's index.json.
fn index_entries(oci: &Path) -> Vec<Value> {
    let idx: Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
    idx["manifests"].as_array().unwrap().clone()
}

fn blob(oci: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::read(oci.join("blobs/sha256").join(hex)).unwrap()
}

/// A layout at `dir/oci` holding `NAME:v1` (a small runnable image) with its SBOM stored as
/// `wpimg build` stores it; returns the layout directory and the manifest digest.
fn layout_with_sbom(dir: &Path, name: &str) -> (PathBuf, String) {
    let oci = dir.join("oci");
    let layout = Layout::open_or_create(&oci).unwrap();
    let img = echo_image(&layout, &format!("{name}:v1"), name);
    let sbom = wpimg::sbom::generate(&layout, &img.manifest, name).unwrap();
    let doc = sbom.to_json(wpimg::sbom::Format::SpdxJson);
    wpimg::sbom::artifact::write_sbom(
        &layout,
        &doc,
        wpimg::sbom::Format::SpdxJson,
        &img.manifest,
        &sbom.subject.created,
    )
    .unwrap();
    (oci, img.manifest.digest.to_string())
}

/// `wpimg push --json --from oci:OCI:NAME:v1 --to DEST` with `args` and `env`.
fn push(oci: &Path, name: &str, dest: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = wpimg();
    c.args(["push", "--json", "--from"])
        .arg(format!("oci:{}:{name}:v1", oci.display()))
        .args(["--to", dest])
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

/// `wpimg verify REF ARGS --json`: (exit code, the result line, stderr).
fn verify(reference: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, Value, String) {
    let mut c = wpimg();
    c.args(["verify", "--json", reference]).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = run(&mut c);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let result = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "result")
        .unwrap_or(Value::Null);
    (
        o.status.code().unwrap_or(-1),
        result,
        format!("{stdout}{}", String::from_utf8_lossy(&o.stderr)),
    )
}

/// The reason `wpimg verify` gives, or `Ok`, as [`ToolVerifier::check`] does.
fn verdict(reference: &str, public_key: &Path) -> Result<(), String> {
    let (code, r, text) = verify(reference, &["--key", public_key.to_str().unwrap()], &[]);
    match code {
        0 => {
            assert_eq!(r["verified"], true, "{text}");
            Ok(())
        }
        1 => {
            assert_eq!(r["verified"], false, "{text}");
            let reason = r["reason"].as_str().unwrap().to_string();
            assert!(text.contains(&reason), "{text}");
            Err(reason)
        }
        _ => panic!("verify {reference}: exit {code}: {text}"),
    }
}

/// The base64 lines of a PEM file (key material).
fn pem_body(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_string)
        .collect()
}

/// None of `needles` in the outputs.
fn assert_not_shown(outputs: &[&Output], needles: &[String]) {
    for o in outputs {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        for n in needles {
            assert!(!text.contains(n.as_str()), "secret shown: {n}\n{text}");
        }
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }
}

/// None of `needles` in any blob the registry stores (compressed or not).
fn assert_not_in_registry(reg: &Registry, needles: &[String]) {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else if e.file_name() == "data" {
                out.push(e.path());
            }
        }
    }
    let mut blobs = Vec::new();
    walk(
        &reg.dir.path().join("data/docker/registry/v2/blobs"),
        &mut blobs,
    );
    assert!(!blobs.is_empty(), "no blobs in the registry");
    for b in blobs {
        let raw = std::fs::read(&b).unwrap();
        let plain = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut v = Vec::new();
            flate2::read::MultiGzDecoder::new(raw.as_slice())
                .read_to_end(&mut v)
                .unwrap();
            v
        } else {
            raw
        };
        for n in needles {
            assert!(
                !plain.windows(n.len()).any(|w| w == n.as_bytes()),
                "a secret is in blob {}",
                b.display()
            );
        }
    }
}

fn tags(registry_host: &str, repo: &str, creds: Option<&str>) -> Vec<String> {
    let mut c = Command::new("skopeo");
    c.args(["list-tags", "--tls-verify=false"]);
    if let Some(cr) = creds {
        c.args(["--creds", cr]);
    }
    let out = ok_stdout(c.arg(format!("docker://{registry_host}/{repo}")));
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut t: Vec<String> = v["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    t.sort();
    t
}

fn cosign_tag(digest: &str, suffix: &str) -> String {
    format!(
        "sha256-{}.{suffix}",
        digest.strip_prefix("sha256:").unwrap()
    )
}

#[test]
fn build_stores_the_sbom_of_the_image_and_wpimg_sbom_prints_it() {
    require_fixtures();
    let p = tempfile::tempdir().unwrap();
    let name = unique("wpimg-test/sbom");
    write_project(p.path(), &name);
    let image = format!("{name}:v1");
    let _g = ImageGuard(image.clone());
    let oci = p.path().join(".wpimg/oci");
    // Outside the project: files next to the playbook are part of the build cache key.
    let out = tempfile::tempdir().unwrap();

    let r = build(p.path(), &["image.yaml", "--load"]);
    let manifest = r["manifest"]["digest"].as_str().unwrap().to_string();
    assert_eq!(r["sbom"]["subject"], manifest.as_str(), "{r}");
    assert_eq!(r["sbom"]["format"], "spdx-json");
    assert!(r["sbom"]["packages"].as_u64().unwrap() > 50, "{r}");
    let stages = stage_names(&r);
    let at = |s: &str| stages.iter().position(|x| x == s).unwrap();
    assert!(at("assemble") < at("sbom"), "{stages:?}");

    // In the layout: an untagged artifact whose subject is the image manifest.
    let artifact = r["sbom"]["artifact"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let entries = index_entries(&oci);
    let entry = entries
        .iter()
        .find(|e| e["digest"] == artifact.as_str())
        .unwrap();
    assert_eq!(entry["artifactType"], SPDX);
    assert!(entry["annotations"]["org.opencontainers.image.ref.name"].is_null());
    let m: Value = serde_json::from_slice(&blob(&oci, &artifact)).unwrap();
    assert_eq!(m["subject"]["digest"], manifest.as_str());
    assert_eq!(m["artifactType"], SPDX);
    let stored = blob(&oci, m["layers"][0]["digest"].as_str().unwrap());

    // `wpimg sbom NAME:TAG --oci-dir`: the stored document, valid, equal to dpkg-query in the
    // image; the purged package is absent (it is in the base).
    let o = run(wpimg().arg("--oci-dir").arg(&oci).args(["sbom", &image]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, stored, "the stored document is printed");
    let spdx_path = out.path().join("out.spdx.json");
    std::fs::write(&spdx_path, &o.stdout).unwrap();
    assert_spdx_valid(&spdx_path);
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let expected = dpkg_query(&image);
    assert_eq!(spdx_set(&doc), expected);
    assert!(!expected.iter().any(|(n, _)| n == PURGED));
    assert!(dpkg_query(BASE).iter().any(|(n, _)| n == PURGED));
    assert_eq!(doc["packages"][0]["versionInfo"], manifest.as_str());

    // Another format is made from the layers, on output.
    let o = run(wpimg().arg("--oci-dir").arg(&oci).args([
        "sbom",
        &image,
        "--format",
        "cyclonedx-json",
        "--json",
    ]));
    let res = json_ok(&o);
    assert_eq!(res["source"], "scanned");
    assert_eq!(res["subject"], manifest.as_str());
    let cdx_path = out.path().join("out.cdx.json");
    std::fs::write(&cdx_path, serde_json::to_vec(&res["document"]).unwrap()).unwrap();
    assert_cyclonedx_valid(&cdx_path);
    let cdx_names: std::collections::BTreeSet<(String, String)> = res["document"]["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["type"] == "library")
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["version"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(cdx_names, expected);

    // Attachments are not images: inspect and push find the one image of the layout.
    let o = run(wpimg().args(["inspect", "--json", &format!("oci:{}", oci.display())]));
    assert_eq!(json_ok(&o)["digest"], manifest.as_str());

    // An unchanged rebuild (cache hit) gives the same SBOM artifact, stored once.
    let again = build(p.path(), &["image.yaml"]);
    assert_eq!(again["cache"], "hit", "{again}");
    assert_eq!(again["manifest"]["digest"], manifest.as_str());
    assert_eq!(again["sbom"]["artifact"]["digest"], artifact.as_str());
    let spdx_entries = index_entries(&oci)
        .iter()
        .filter(|e| e["artifactType"] == SPDX)
        .count();
    assert_eq!(spdx_entries, 1);

    // `sbom: { format: cyclonedx-json }`: the stored document is CycloneDX.
    let cdx = build(p.path(), &["cdx.yaml"]);
    assert_eq!(cdx["sbom"]["format"], "cyclonedx-json");
    let o =
        run(wpimg()
            .arg("--oci-dir")
            .arg(&oci)
            .args(["sbom", &format!("{name}-cdx:v1"), "--json"]));
    let res = json_ok(&o);
    assert_eq!(res["source"], "stored");
    assert_eq!(res["format"], "cyclonedx-json");
    assert_eq!(res["document"]["bomFormat"], "CycloneDX");

    // `sbom: false`: no stage, no artifact.
    let before = index_entries(&oci).len();
    let off = build(p.path(), &["nosbom.yaml"]);
    assert!(off["sbom"].is_null(), "{off}");
    assert!(!stage_names(&off).contains(&"sbom".to_string()));
    assert_eq!(
        index_entries(&oci).len(),
        before + 1,
        "only the new image's tag"
    );
}

#[test]
fn push_signs_with_a_file_key_under_cosigns_tags_where_there_are_no_referrers() {
    require("skopeo");
    let reg = Registry::start();
    let host = reg.host();
    let d = tempfile::tempdir().unwrap();
    let (oci, digest) = layout_with_sbom(d.path(), "app");
    let (key_a, pub_a) = openssl_key(d.path(), "a");
    let (key_b, _) = openssl_key(d.path(), "b");
    let key_a_arg = key_a.to_str().unwrap();

    let signed = push(
        &oci,
        "app",
        &format!("{host}/signed:v1"),
        &["--sign-key", key_a_arg],
        &[],
    );
    let r = json_ok(&signed);
    let a = &r["attachments"];
    assert_eq!(a["mode"], "tags", "{r}");
    assert_eq!(
        a["signature"]["reference"],
        format!("{host}/signed:{}", cosign_tag(&digest, "sig"))
    );
    assert_eq!(a["signature"]["digest"], digest.as_str());
    assert!(a["signature"]["signer"]
        .as_str()
        .unwrap()
        .starts_with("key sha256:"));
    assert_eq!(a["sboms"][0]["subject"], digest.as_str());
    assert_eq!(
        a["sboms"][0]["reference"],
        format!("{host}/signed:{}", cosign_tag(&digest, "sbom"))
    );
    let mut want = vec![
        "v1".to_string(),
        cosign_tag(&digest, "sbom"),
        cosign_tag(&digest, "sig"),
    ];
    want.sort();
    assert_eq!(tags(&host, "signed", None), want);
    let unsigned = push(&oci, "app", &format!("{host}/unsigned:v1"), &[], &[]);
    assert!(json_ok(&unsigned)["attachments"]["signature"].is_null());
    // `--from oci:DIR` without a name: the SBOM artifact is not a second image.
    let noref = run(wpimg().args([
        "push",
        "--json",
        "--from",
        &format!("oci:{}", oci.display()),
        "--to",
        &format!("{host}/noref:v1"),
    ]));
    assert_eq!(json_ok(&noref)["digest"], digest.as_str());
    let other = push(
        &oci,
        "app",
        &format!("{host}/other-key:v1"),
        &["--sign-key", key_b.to_str().unwrap()],
        &[],
    );
    json_ok(&other);

    // The independent tools and `wpimg verify` agree on every case.
    let tools = ToolVerifier::new(&host, d.path());
    for (repo, expected) in [
        ("signed", Ok(())),
        ("unsigned", Err("no signature")),
        ("other-key", Err("wrong key")),
    ] {
        assert_eq!(
            tools.check(repo, "v1", &pub_a),
            expected,
            "{repo} by the tools"
        );
        let ours = verdict(&format!("{host}/{repo}:v1"), &pub_a);
        assert_eq!(ours, expected.map_err(str::to_string), "{repo} by wpimg");
    }
    let (code, res, _) = verify(
        &format!("docker://{host}/signed:v1"),
        &["--key", pub_a.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0);
    assert_eq!(res["digest"], digest.as_str());
    assert_eq!(res["signer"], a["signature"]["signer"]);
    assert_eq!(
        res["payload"]["critical"]["image"]["docker-manifest-digest"],
        digest.as_str()
    );
    assert_eq!(
        res["payload"]["critical"]["identity"]["docker-reference"],
        format!("{host}/signed")
    );

    // `wpimg sbom` of the registry image: the document under the .sbom tag, as stored.
    let o = run(wpimg().args(["sbom", "--json", &format!("{host}/signed:v1")]));
    let res = json_ok(&o);
    assert_eq!(res["source"], "stored");
    let stored =
        wpimg::sbom::artifact::find_sboms(&Layout::open(&oci).unwrap(), &digest.parse().unwrap())
            .unwrap();
    let doc =
        wpimg::sbom::artifact::read_document(&Layout::open(&oci).unwrap(), &stored[0]).unwrap();
    assert_eq!(
        res["document"],
        serde_json::from_slice::<Value>(&doc).unwrap()
    );

    // No key material in any output or pushed blob.
    let key_lines = pem_body(&key_a);
    assert_not_shown(&[&signed, &unsigned, &other], &key_lines);
    assert_not_in_registry(&reg, &key_lines);
}

#[test]
fn cosign_encrypted_key_password_from_the_environment_or_stdin_is_never_shown() {
    let reg = Registry::start();
    let host = reg.host();
    let d = tempfile::tempdir().unwrap();
    let (oci, _) = layout_with_sbom(d.path(), "app");
    let key = d.path().join("cosign.key");
    std::fs::write(
        &key,
        include_str!("../../src/sign/testdata/cosign-sigstore.key"),
    )
    .unwrap();
    let key_arg = key.to_str().unwrap().to_string();
    let public = d.path().join("cosign.pub");
    let private =
        wpimg::sign::PrivateKey::load(&key, Some(&wpimg::auth::Secret::new("hello"))).unwrap();
    std::fs::write(&public, private.public_key().to_pem()).unwrap();

    // A wrong password: bad input before anything is pushed, the password not echoed.
    let wrong = push(
        &oci,
        "app",
        &format!("{host}/enc:v1"),
        &["--sign-key", &key_arg],
        &[("COSIGN_PASSWORD", "not-the-pw-4711")],
    );
    assert_eq!(wrong.status.code(), Some(2));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("wrong password"), "{err}");
    assert!(
        !reg.dir
            .path()
            .join("data/docker/registry/v2/repositories/enc")
            .exists(),
        "something was pushed"
    );
    let missing = push(
        &oci,
        "app",
        &format!("{host}/enc:v1"),
        &["--sign-key", &key_arg],
        &[],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("COSIGN_PASSWORD"));

    // COSIGN_PASSWORD, then --sign-password-stdin.
    let by_env = push(
        &oci,
        "app",
        &format!("{host}/enc:v1"),
        &["--sign-key", &key_arg],
        &[("COSIGN_PASSWORD", "hello")],
    );
    json_ok(&by_env);
    assert_eq!(verdict(&format!("{host}/enc:v1"), &public), Ok(()));
    let mut c = wpimg();
    c.env_remove("COSIGN_PASSWORD")
        .args(["push", "--json", "--from"])
        .arg(format!("oci:{}:app:v1", oci.display()))
        .args(["--to", &format!("{host}/enc-stdin:v1")])
        .args(["--sign-key", &key_arg, "--sign-password-stdin"]);
    let by_stdin = run_with_stdin(&mut c, b"hello\n");
    json_ok(&by_stdin);
    assert_eq!(verdict(&format!("{host}/enc-stdin:v1"), &public), Ok(()));
    let tools = ToolVerifier::new(&host, d.path());
    assert_eq!(tools.check("enc-stdin", "v1", &public), Ok(()));

    let secrets: Vec<String> = pem_body(&key)
        .into_iter()
        .chain(["not-the-pw-4711".to_string()])
        .collect();
    assert_not_shown(&[&wrong, &missing, &by_env, &by_stdin], &secrets);
    assert_not_in_registry(&reg, &secrets);
}

/// moto's KMS public key of `key_id` as a PEM file (boto3 + openssl, not wpimg).
fn kms_public_key_pem(moto: &Moto, key_id: &str, out: &Path) {
    let script = format!(
        "import boto3,base64\nk=boto3.client('kms',region_name='us-east-1',endpoint_url='{}',\
         aws_access_key_id='testing',aws_secret_access_key='testing')\n\
         print(base64.b64encode(k.get_public_key(KeyId='{key_id}')['PublicKey']).decode())\n",
        moto.url
    );
    let b64 = ok_stdout(Command::new(VENV_PYTHON).args(["-c", &script]));
    let der = out.with_extension("der");
    let raw = run_with_stdin(Command::new("base64").arg("-d"), b64.trim().as_bytes());
    std::fs::write(&der, raw.stdout).unwrap();
    ok_stdout(
        Command::new("openssl")
            .args(["pkey", "-pubin", "-inform", "DER", "-in"])
            .arg(&der)
            .arg("-out")
            .arg(out),
    );
}

#[test]
fn push_signs_with_an_aws_kms_key() {
    let moto = Moto::start();
    let alias = unique("wpimg-sign").replace('/', "-");
    let arn = moto_kms_key(&moto, &alias, "ECC_NIST_P256");
    let rsa = moto_kms_key(&moto, &format!("{alias}-rsa"), "RSA_2048");
    let reg = Registry::start();
    let host = reg.host();
    let d = tempfile::tempdir().unwrap();
    let (oci, _) = layout_with_sbom(d.path(), "app");
    let kms_pub = d.path().join("kms.pub");
    kms_public_key_pem(&moto, &arn, &kms_pub);
    let (_, other_pub) = openssl_key(d.path(), "other");
    let secret = "kms-secret-key-0815";
    let aws = [
        ("AWS_ENDPOINT_URL_KMS", moto.url.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let key_ref = format!("awskms:///alias/{alias}");

    let signed = push(
        &oci,
        "app",
        &format!("{host}/kms:v1"),
        &["--sign-kms", &key_ref],
        &aws,
    );
    let r = json_ok(&signed);
    assert_eq!(r["attachments"]["signature"]["signer"], key_ref.as_str());
    // By the key ARN too (its region from the ARN).
    let by_arn = push(
        &oci,
        "app",
        &format!("{host}/kms-arn:v1"),
        &["--sign-kms", &format!("awskms:///{arn}")],
        &aws,
    );
    json_ok(&by_arn);
    json_ok(&push(
        &oci,
        "app",
        &format!("{host}/kms-unsigned:v1"),
        &[],
        &[],
    ));

    let tools = ToolVerifier::new(&host, d.path());
    for repo in ["kms", "kms-arn"] {
        assert_eq!(tools.check(repo, "v1", &kms_pub), Ok(()), "{repo}");
        assert_eq!(verdict(&format!("{host}/{repo}:v1"), &kms_pub), Ok(()));
        assert_eq!(
            tools.check(repo, "v1", &other_pub),
            Err("wrong key"),
            "{repo}"
        );
        assert_eq!(
            verdict(&format!("{host}/{repo}:v1"), &other_pub),
            Err("wrong key".into())
        );
    }
    assert_eq!(
        tools.check("kms-unsigned", "v1", &kms_pub),
        Err("no signature")
    );
    // `wpimg verify --kms`: the public key from KMS.
    let (code, res, text) = verify(&format!("{host}/kms:v1"), &["--kms", &key_ref], &aws);
    assert_eq!(code, 0, "{text}");
    assert_eq!(res["signer"], key_ref.as_str());
    let (code, res, _) = verify(
        &format!("{host}/kms-unsigned:v1"),
        &["--kms", &key_ref],
        &aws,
    );
    assert_eq!((code, res["reason"].as_str()), (1, Some("no signature")));

    // An RSA key cannot make cosign signatures: bad input, nothing pushed.
    let bad = push(
        &oci,
        "app",
        &format!("{host}/kms-rsa:v1"),
        &["--sign-kms", &format!("awskms:///{rsa}")],
        &aws,
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ECC_NIST_P256"));
    assert!(!reg
        .dir
        .path()
        .join("data/docker/registry/v2/repositories/kms-rsa")
        .exists());
    assert_not_shown(&[&signed, &by_arn, &bad], &[secret.to_string()]);
}

/// The signature referrer of `digest` checked with independent tools: the proxy's referrers
/// answer (curl), the manifest and payload from the registry (curl), the signature (openssl).
fn tool_check_referrer(proxy: &Proxy, reg: &Registry, repo: &str, digest: &str, public: &Path) {
    let list = ok_stdout(Command::new("curl").args([
        "-sfS",
        &format!("{}/v2/{repo}/referrers/{digest}", proxy.url()),
    ]));
    let list: Value = serde_json::from_str(&list).unwrap();
    let sig = list["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["artifactType"] == COSIGN_SIG)
        .expect("a signature referrer");
    let m = ok_stdout(Command::new("curl").args([
        "-sfS",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!(
            "{}/v2/{repo}/manifests/{}",
            reg.url(),
            sig["digest"].as_str().unwrap()
        ),
    ]));
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["subject"]["digest"], digest);
    let layer = &m["layers"][0];
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload");
    ok_stdout(
        Command::new("curl")
            .args(["-sfS", "-o"])
            .arg(&payload)
            .arg(format!(
                "{}/v2/{repo}/blobs/{}",
                reg.url(),
                layer["digest"].as_str().unwrap()
            )),
    );
    let sig_b64 = layer["annotations"]["dev.cosignproject.cosign/signature"]
        .as_str()
        .unwrap();
    let raw = run_with_stdin(Command::new("base64").arg("-d"), sig_b64.as_bytes());
    let sig_file = dir.path().join("sig");
    std::fs::write(&sig_file, raw.stdout).unwrap();
    ok_stdout(
        Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(public)
            .arg("-signature")
            .arg(&sig_file)
            .arg(&payload),
    );
    let p: Value = serde_json::from_slice(&std::fs::read(&payload).unwrap()).unwrap();
    assert_eq!(p["critical"]["image"]["docker-manifest-digest"], digest);
}

#[test]
fn build_push_to_a_registry_with_referrers_attaches_artifacts_with_subject() {
    require_fixtures();
    require("skopeo");
    let reg = Registry::start();
    let proxy = Proxy::start(
        &reg.url(),
        ProxyMode {
            referrers: true,
            ..Default::default()
        },
    );
    let p = tempfile::tempdir().unwrap();
    let name = unique("wpimg-test/referrers");
    write_project(p.path(), &name);
    let (key_a, pub_a) = openssl_key(p.path(), "a");
    let (_, pub_b) = openssl_key(p.path(), "b");
    let dest = format!("{}/app:v1", proxy.host());

    let r = build(
        p.path(),
        &[
            "image.yaml",
            "--push",
            "--to",
            &dest,
            "--sign-key",
            key_a.to_str().unwrap(),
        ],
    );
    let digest = r["manifest"]["digest"].as_str().unwrap().to_string();
    let a = &r["push"]["attachments"];
    assert_eq!(a["mode"], "referrers", "{r}");
    assert_eq!(a["signature"]["digest"], digest.as_str());
    assert!(a["signature"]["reference"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{}/app@sha256:", proxy.host())));
    // Two referrers of the manifest, recorded from manifests pushed with a subject.
    let refs = proxy.referrers_of("app", &digest);
    let mut types: Vec<&str> = refs
        .iter()
        .map(|d| d["artifactType"].as_str().unwrap())
        .collect();
    types.sort();
    assert_eq!(types, [SPDX, COSIGN_SIG], "{refs:?}");
    assert_eq!(
        refs.iter().find(|d| d["artifactType"] == SPDX).unwrap()["digest"],
        r["sbom"]["artifact"]["digest"]
    );
    assert!(
        proxy
            .requests()
            .iter()
            .any(|l| l.path.contains("/referrers/")),
        "the referrers API was asked"
    );
    // No cosign tags: only the image's own tag.
    assert_eq!(tags(&reg.host(), "app", None), ["v1"]);
    tool_check_referrer(&proxy, &reg, "app", &digest, &pub_a);

    // `wpimg verify` finds it through the referrers API.
    assert_eq!(verdict(&dest, &pub_a), Ok(()));
    assert_eq!(verdict(&dest, &pub_b), Err("wrong key".into()));
    json_ok(&run(wpimg().current_dir(p.path()).args([
        "push",
        "--json",
        "--to",
        &format!("{}/unsigned:v1", proxy.host()),
    ])));
    assert_eq!(
        verdict(&format!("{}/unsigned:v1", proxy.host()), &pub_a),
        Err("no signature".into())
    );

    // `wpimg sbom` of the registry image: the stored referrer, and CycloneDX from the layers.
    let res = json_ok(&run(wpimg().args(["sbom", "--json", &dest])));
    assert_eq!(res["source"], "stored");
    assert_eq!(res["format"], "spdx-json");
    let oci = p.path().join(".wpimg/oci");
    let art: Value = serde_json::from_slice(&blob(
        &oci,
        r["sbom"]["artifact"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let stored: Value =
        serde_json::from_slice(&blob(&oci, art["layers"][0]["digest"].as_str().unwrap())).unwrap();
    assert_eq!(res["document"], stored);
    let res = json_ok(&run(wpimg().args([
        "sbom",
        "--json",
        &dest,
        "--format",
        "cyclonedx-json",
    ])));
    assert_eq!(res["source"], "scanned");
    let cdx = p.path().join("registry.cdx.json");
    std::fs::write(&cdx, serde_json::to_vec(&res["document"]).unwrap()).unwrap();
    assert_cyclonedx_valid(&cdx);
    assert!(!res["document"]["components"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == PURGED));
}

/// A layout at `dir/oci` holding `multi:v1`, an index of two platform images (this machine's
/// and another architecture), each with its SBOM stored; returns the layout, the index digest
/// and the platform manifests' digests.
fn index_with_sboms(dir: &Path) -> (PathBuf, String, Vec<String>) {
    use wpimg::oci::Platform;
    let oci = dir.join("oci");
    let layout = Layout::open_or_create(&oci).unwrap();
    let host = echo_image(&layout, "multi-host:v1", "host");
    let other_arch = if Platform::host().architecture == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let config: Value =
        serde_json::from_slice(&layout.read_blob(&host.config.digest).unwrap()).unwrap();
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().parse().unwrap())
        .collect();
    let other = write_image_for(
        &layout,
        "multi-other:v1",
        other_arch,
        host.layers.clone(),
        diff_ids,
        None,
    );
    let mut children = Vec::new();
    for (img, arch) in [
        (&host, Platform::host().architecture),
        (&other, other_arch.to_string()),
    ] {
        let sbom = wpimg::sbom::generate(&layout, &img.manifest, "multi").unwrap();
        let doc = sbom.to_json(wpimg::sbom::Format::SpdxJson);
        wpimg::sbom::artifact::write_sbom(
            &layout,
            &doc,
            wpimg::sbom::Format::SpdxJson,
            &img.manifest,
            &sbom.subject.created,
        )
        .unwrap();
        let mut d = img.manifest.clone();
        d.platform = Platform::parse(&format!("linux/{arch}"));
        children.push(d);
    }
    let index = wpimg::oci::Index::new(children.clone());
    layout.write_index(&index).unwrap();
    layout.tag("multi:v1", &index.descriptor).unwrap();
    (
        oci,
        index.descriptor.digest.to_string(),
        children.iter().map(|c| c.digest.to_string()).collect(),
    )
}

#[test]
fn an_index_is_signed_and_each_platform_manifest_gets_its_sbom() {
    require("skopeo");
    let reg = Registry::start();
    let proxy = Proxy::start(
        &reg.url(),
        ProxyMode {
            referrers: true,
            ..Default::default()
        },
    );
    let d = tempfile::tempdir().unwrap();
    let (oci, index, children) = index_with_sboms(d.path());
    let (key, public) = openssl_key(d.path(), "k");
    let key = key.to_str().unwrap();

    // Referrers: the signature refers to the index, each SBOM to its platform manifest.
    let dest = format!("{}/multi:v1", proxy.host());
    let r = json_ok(&push(&oci, "multi", &dest, &["--sign-key", key], &[]));
    assert_eq!(r["digest"], index.as_str());
    assert_eq!(r["attachments"]["mode"], "referrers");
    assert_eq!(r["attachments"]["signature"]["digest"], index.as_str());
    assert_eq!(
        r["attachments"]["sboms"].as_array().unwrap().len(),
        2,
        "{r}"
    );
    let types = |digest: &str| -> Vec<String> {
        proxy
            .referrers_of("multi", digest)
            .iter()
            .map(|d| d["artifactType"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(types(&index), [COSIGN_SIG]);
    for c in &children {
        assert_eq!(types(c), [SPDX], "{c}");
    }
    assert_eq!(verdict(&dest, &public), Ok(()));
    // The index ECS pulls holds the two images and nothing else.
    let raw = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/multi:v1", reg.host()),
    ]));
    let pulled: Value = serde_json::from_str(&raw).unwrap();
    let listed: Vec<&str> = pulled["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        children.iter().map(String::as_str).collect::<Vec<_>>()
    );
    // `wpimg sbom` picks the platform's document.
    let res = json_ok(&run(wpimg().args([
        "sbom",
        "--json",
        &dest,
        "--platform",
        "linux/amd64",
    ])));
    let amd = if wpimg::oci::Platform::host().architecture == "amd64" {
        0
    } else {
        1
    };
    assert_eq!(res["subject"], children[amd].as_str());
    assert_eq!(res["source"], "stored");

    // Cosign's tags: the index's .sig, one .sbom per platform manifest.
    let r = json_ok(&push(
        &oci,
        "multi",
        &format!("{}/tagged:v1", reg.host()),
        &["--sign-key", key],
        &[],
    ));
    assert_eq!(r["attachments"]["mode"], "tags");
    let mut want = vec!["v1".to_string(), cosign_tag(&index, "sig")];
    want.extend(children.iter().map(|c| cosign_tag(c, "sbom")));
    want.sort();
    assert_eq!(tags(&reg.host(), "tagged", None), want);
    let tools = ToolVerifier::new(&reg.host(), d.path());
    assert_eq!(tools.check("tagged", "v1", &public), Ok(()));
    assert_eq!(
        verdict(&format!("{}/tagged:v1", reg.host()), &public),
        Ok(())
    );
}

/// moto for the ECR API, the htpasswd registry and an ECR-like proxy (`referrers` or not)
/// in front of it; a project in `dir` targets `REPO:v1` with `ecr_yaml` settings and holds
/// `app:v1` with its SBOM in `.wpimg/oci`.
struct EcrEnv {
    moto: Moto,
    _reg: Registry,
    proxy: Proxy,
    aws: tempfile::TempDir,
}

const REGION: &str = "us-east-1";

fn ecr_host() -> String {
    format!("{MOTO_ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com")
}

fn ecr_env(referrers: bool) -> EcrEnv {
    let moto = Moto::start();
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(("AWS".into(), format!("{MOTO_ACCOUNT}-auth-token"))),
        tls: false,
    });
    let proxy = Proxy::start(
        &reg.url(),
        ProxyMode {
            immutable_tags: true,
            referrers,
            known_repositories: Some(KnownRepositories {
                account: MOTO_ACCOUNT.into(),
                names: vec!["wp".into(), "wpx".into()],
            }),
            ..Default::default()
        },
    );
    EcrEnv {
        moto,
        _reg: reg,
        proxy,
        aws: tempfile::tempdir().unwrap(),
    }
}

fn ecr_project(dir: &Path, repo: &str, ecr_yaml: &str) {
    crate::common::ecr::write_ecr_image_yaml(dir, &format!("{}/{repo}", ecr_host()), ecr_yaml);
    let (oci, _) = layout_with_sbom(dir, "app");
    std::fs::create_dir_all(dir.join(".wpimg")).unwrap();
    std::fs::rename(oci, dir.join(".wpimg/oci")).unwrap();
}

/// `wpimg push --ecr --sign-key KEY` of the project in `dir` through the proxy.
fn ecr_push(env: &EcrEnv, dir: &Path, key: &Path) -> (Option<i32>, Value, String) {
    let endpoint = env.proxy.url();
    crate::common::ecr::wpimg_push_ecr(
        &env.moto,
        dir,
        env.aws.path(),
        &[
            "--registry-endpoint",
            &endpoint,
            "--sign-key",
            key.to_str().unwrap(),
        ],
    )
}

fn describe_repository(env: &EcrEnv, repo: &str) -> Value {
    let script = format!(
        "import boto3,json\nc=boto3.client('ecr',region_name='{REGION}',endpoint_url='{}',\
         aws_access_key_id='t',aws_secret_access_key='t')\n\
         print(json.dumps(c.describe_repositories(repositoryNames=['{repo}'])['repositories'][0],default=str))\n",
        env.moto.url
    );
    serde_json::from_str(&ok_stdout(Command::new(VENV_PYTHON).args(["-c", &script]))).unwrap()
}

#[test]
fn immutable_ecr_repository_without_referrers_is_refused_before_any_upload() {
    let env = ecr_env(false);
    let dir = tempfile::tempdir().unwrap();
    ecr_project(
        dir.path(),
        "wp",
        &format!(
            "    region: {REGION}\n    create_repository: true\n    tag_immutability: IMMUTABLE\n"
        ),
    );
    let (key, public) = openssl_key(dir.path(), "k");

    let (code, r, stderr) = ecr_push(&env, dir.path(), &key);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(r["event"], "error");
    for said in [
        "IMMUTABLE tags",
        "referrers API",
        "IMMUTABLE_WITH_EXCLUSION",
        "tag_immutability_exclusion_filters",
        "sha256-*",
        ".sig",
        "nothing was uploaded",
    ] {
        assert!(stderr.contains(said), "{said:?} missing: {stderr}");
    }
    let reqs = env.proxy.requests();
    assert!(
        reqs.iter().any(|l| l.path.contains("/referrers/")),
        "the referrers API was not asked: {reqs:?}"
    );
    assert!(
        reqs.iter().all(|l| l.method == "GET" || l.method == "HEAD"),
        "something was uploaded: {reqs:#?}"
    );

    // Created with IMMUTABLE_WITH_EXCLUSION (target.ecr's default filter sha256-*): cosign's
    // tags may be written, the image's own tags stay immutable.
    let dir2 = tempfile::tempdir().unwrap();
    ecr_project(
        dir2.path(),
        "wpx",
        &format!(
            "    region: {REGION}\n    create_repository: true\n    tag_immutability: IMMUTABLE_WITH_EXCLUSION\n"
        ),
    );
    let (code, r, stderr) = ecr_push(&env, dir2.path(), &key);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(r["attachments"]["mode"], "tags", "{r}");
    let desc = describe_repository(&env, "wpx");
    assert_eq!(
        desc["imageTagMutability"], "IMMUTABLE_WITH_EXCLUSION",
        "{desc}"
    );
    assert_eq!(
        desc["imageTagMutabilityExclusionFilters"][0]["filter"], "sha256-*",
        "{desc}"
    );
    let digest = r["digest"].as_str().unwrap();
    // `wpimg verify` with the registry's credentials (moto's token) through the proxy.
    let o = run_with_stdin(
        wpimg().args([
            "verify",
            "--json",
            &format!("{}/wpx:v1", env.proxy.host()),
            "--key",
            public.to_str().unwrap(),
            "--username",
            "AWS",
            "--password-stdin",
        ]),
        format!("{MOTO_ACCOUNT}-auth-token\n").as_bytes(),
    );
    assert_eq!(json_ok(&o)["digest"], digest);
    let creds = format!("AWS:{MOTO_ACCOUNT}-auth-token");
    let t = tags(&env.proxy.host(), "wpx", Some(&creds));
    assert!(t.contains(&cosign_tag(digest, "sig")), "{t:?}");
    assert!(t.contains(&cosign_tag(digest, "sbom")), "{t:?}");
}

#[test]
fn immutable_ecr_repository_with_referrers_takes_the_attachments_as_artifacts() {
    let env = ecr_env(true);
    let dir = tempfile::tempdir().unwrap();
    ecr_project(
        dir.path(),
        "wp",
        &format!(
            "    region: {REGION}\n    create_repository: true\n    tag_immutability: IMMUTABLE\n"
        ),
    );
    let (key, _) = openssl_key(dir.path(), "k");
    let (code, r, stderr) = ecr_push(&env, dir.path(), &key);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(r["attachments"]["mode"], "referrers", "{r}");
    let digest = r["digest"].as_str().unwrap();
    assert_eq!(env.proxy.referrers_of("wp", digest).len(), 2);
    let creds = format!("AWS:{MOTO_ACCOUNT}-auth-token");
    assert_eq!(tags(&env.proxy.host(), "wp", Some(&creds)), ["v1"]);
}

#[test]
fn sign_and_verify_flags_are_checked_before_anything_happens() {
    let d = tempfile::tempdir().unwrap();
    let code = |o: Output| {
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // verify needs a key.
    let (c, e) = code(run(wpimg().args(["verify", "127.0.0.1:1/x:v1"])));
    assert_eq!(c, Some(2), "{e}");
    // A bad format name.
    let (c, e) = code(run(wpimg().args(["sbom", "x:v1", "--format", "spdx"])));
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("spdx-json"), "{e}");
    // Signing flags without --push, and a key file that is not there.
    let (c, e) = code(run(wpimg().current_dir(d.path()).args([
        "build",
        "--sign-key",
        "k.pem",
    ])));
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("--push"), "{e}");
    let (oci, _) = layout_with_sbom(d.path(), "app");
    let (c, e) = code(push(
        &oci,
        "app",
        "127.0.0.1:1/x:v1",
        &["--sign-key", "/nonexistent/key.pem"],
        &[],
    ));
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("/nonexistent/key.pem"), "{e}");
    let (c, e) = code(push(
        &oci,
        "app",
        "127.0.0.1:1/x:v1",
        &["--sign-kms", "awskms:///nope"],
        &[],
    ));
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("awskms://"), "{e}");
    // Both passwords cannot come from stdin.
    let (c, _) = code(run(wpimg().args([
        "push",
        "--sign-key",
        "k",
        "--sign-password-stdin",
        "--username",
        "u",
        "--password-stdin",
    ])));
    assert_eq!(c, Some(2));
}
