//! cosign-compatible signatures against real components (issue 14): images pushed to a real
//! registry on loopback with wpimg's client, signed with a file key (openssl-made PKCS#8 or
//! cosign's own encrypted test key) or an AWS KMS key (moto), the signature pushed under
//! cosign's tag; cosign's verification done with independent tools (skopeo, curl, openssl) and
//! `wpimg::sign::verify` must agree on every case: accepted, unsigned, another key, a signature
//! for another digest.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::ecr::{child_test, run_child_test, Moto, VENV_PYTHON};
use crate::common::registry::{echo_image, skopeo_manifest_digest, Registry};
use crate::common::{ok_stdout, require, run, unique};
use wpimg::auth::Secret;
use wpimg::events;
use wpimg::layout::Layout;
use wpimg::oci::Digest;
use wpimg::reference::Reference;
use wpimg::registry::{Client, ClientOptions};
use wpimg::sign::{self, cosign, remote, KmsKeyRef, KmsSigner, PrivateKey, PublicKey, Signer};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client() -> Client {
    Client::new(ClientOptions::default()).unwrap()
}

/// A P-256 key pair made by openssl: (private PKCS#8 PEM, public SPKI PEM).
pub(crate) fn openssl_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    require("openssl");
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    ok_stdout(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ])
            .arg(&key),
    );
    ok_stdout(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public),
    );
    (key, public)
}

/// cosign's key-based verification (what `cosign verify --key` and a `sigstoreSigned` policy
/// check: the simple-signing layers under the `sha256-<hex>.sig` tag, an ECDSA-SHA256
/// signature over each payload, a payload naming the manifest digest) done with tools
/// independent of wpimg: skopeo reads the manifests, curl the payload blobs, coreutils decodes
/// the signature and openssl verifies it. Debian's skopeo 1.9.3 cannot evaluate a
/// `sigstoreSigned` policy itself: it is built with "Debian-local change: sigstore disabled".
pub(crate) struct ToolVerifier {
    host: String,
    dir: PathBuf,
}

impl ToolVerifier {
    pub(crate) fn new(host: &str, dir: &Path) -> Self {
        for tool in ["skopeo", "curl", "openssl", "base64"] {
            require(tool);
        }
        let dir = dir.join(unique("toolverify"));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            host: host.to_string(),
            dir,
        }
    }

    /// `Ok` or the reason: "no signature", "wrong key", "digest mismatch".
    pub(crate) fn check(
        &self,
        repo: &str,
        tag: &str,
        public_key: &Path,
    ) -> Result<(), &'static str> {
        let image = format!("docker://{}/{repo}:{tag}", self.host);
        let digest = skopeo_manifest_digest(&image, &["--tls-verify=false"]);
        let sig_tag = format!("sha256-{}.sig", digest.hex());
        let o = run(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/{repo}:{sig_tag}", self.host),
        ]));
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("manifest unknown"),
                "skopeo inspect {sig_tag}: {err}"
            );
            return Err("no signature");
        }
        let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut mismatch = false;
        for (i, layer) in m["layers"].as_array().unwrap().iter().enumerate() {
            if layer["mediaType"] != "application/vnd.dev.cosign.simplesigning.v1+json" {
                continue;
            }
            let Some(sig_b64) = layer["annotations"]["dev.cosignproject.cosign/signature"].as_str()
            else {
                continue;
            };
            let payload = self.dir.join(format!("{repo}-{i}.payload"));
            let sig = self.dir.join(format!("{repo}-{i}.sig"));
            ok_stdout(
                Command::new("curl")
                    .args(["-sfS", "-o"])
                    .arg(&payload)
                    .arg(format!(
                        "http://{}/v2/{repo}/blobs/{}",
                        self.host,
                        layer["digest"].as_str().unwrap()
                    )),
            );
            let decoded =
                crate::common::run_with_stdin(Command::new("base64").arg("-d"), sig_b64.as_bytes());
            assert!(decoded.status.success());
            std::fs::write(&sig, &decoded.stdout).unwrap();
            let v = run(Command::new("openssl")
                .args(["dgst", "-sha256", "-verify"])
                .arg(public_key)
                .arg("-signature")
                .arg(&sig)
                .arg(&payload));
            if !v.status.success() {
                continue;
            }
            let p: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&payload).unwrap()).unwrap();
            let critical = &p["critical"];
            if critical["type"] == "cosign container image signature"
                && critical["image"]["docker-manifest-digest"] == digest.to_string().as_str()
            {
                return Ok(());
            }
            mismatch = true;
        }
        Err(if mismatch {
            "digest mismatch"
        } else {
            "wrong key"
        })
    }
}

/// Push a small runnable image to `registry/repo:v1`; returns its reference and digest.
fn push_image(
    client: &Client,
    layout: &Layout,
    host: &str,
    repo: &str,
    msg: &str,
) -> (Reference, Digest) {
    let img = echo_image(layout, &format!("{repo}:v1"), msg);
    let dest: Reference = format!("{host}/{repo}:v1").parse().unwrap();
    rt().block_on(client.push_image(layout, &img.manifest, &dest, &[], &events::null()))
        .unwrap();
    (dest, img.manifest.digest)
}

fn sign(
    client: &Client,
    layout: &Layout,
    signer: &Signer,
    image: &Reference,
    digest: &Digest,
) -> remote::SignatureReport {
    rt().block_on(remote::sign_and_push(
        client,
        layout,
        signer,
        image,
        digest,
        &events::null(),
    ))
    .unwrap()
}

fn verify(
    client: &Client,
    layout: &Layout,
    image: &Reference,
    key: &PublicKey,
) -> Result<sign::Verified, sign::Rejection> {
    rt().block_on(remote::verify_remote(
        client,
        layout,
        image,
        key,
        &events::null(),
    ))
    .unwrap()
}

#[test]
fn file_key_signatures_agree_with_independent_tools() {
    let reg = Registry::start();
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(dir.path().join("oci")).unwrap();
    let client = client();
    let (key_a, pub_a) = openssl_key(dir.path(), "a");
    let (key_b, _) = openssl_key(dir.path(), "b");
    let signer_a = Signer::Key(PrivateKey::load(&key_a, None).unwrap());
    let signer_b = Signer::Key(PrivateKey::load(&key_b, None).unwrap());
    let public_a = PublicKey::load(&pub_a).unwrap();

    let (signed, d_signed) = push_image(&client, &layout, &host, "signed", "signed");
    let (unsigned, _) = push_image(&client, &layout, &host, "unsigned", "unsigned");
    let (other, d_other) = push_image(&client, &layout, &host, "other-key", "other key");
    let (moved, d_moved) = push_image(&client, &layout, &host, "moved", "moved signature");

    let report = sign(&client, &layout, &signer_a, &signed, &d_signed);
    assert_eq!(report.signatures, 1);
    assert_eq!(
        report.signature_reference,
        format!("{host}/signed:{}", cosign::signature_tag(&d_signed))
    );
    assert!(!format!("{report:?}").contains("PRIVATE"));
    sign(&client, &layout, &signer_b, &other, &d_other);
    // A valid signature by key A, but for another manifest, placed under `moved`'s tag.
    let foreign = rt()
        .block_on(signer_a.sign_manifest(&moved.repo_path(), &d_signed, &Default::default()))
        .unwrap();
    let img = sign::append_signature(vec![], foreign);
    let desc = img.write(&layout).unwrap();
    rt().block_on(client.push_image(
        &layout,
        &desc,
        &moved.with_tag(&cosign::signature_tag(&d_moved)).unwrap(),
        &[],
        &events::null(),
    ))
    .unwrap();

    let tools = ToolVerifier::new(&host, dir.path());
    let cases = [
        ("signed", Ok(())),
        ("unsigned", Err("no signature")),
        ("other-key", Err("wrong key")),
        ("moved", Err("digest mismatch")),
    ];
    for ((repo, expected), image) in cases.iter().zip([&signed, &unsigned, &other, &moved]) {
        assert_eq!(
            tools.check(repo, "v1", &pub_a),
            *expected,
            "{repo} by the tools"
        );
        let ours = verify(&client, &layout, image, &public_a)
            .map(|_| ())
            .map_err(|r| r.reason());
        assert_eq!(ours, *expected, "{repo} by wpimg");
    }
    let ok = verify(&client, &layout, &signed, &public_a).unwrap();
    assert_eq!(ok.digest, d_signed.to_string());
    assert_eq!(ok.docker_reference, format!("{host}/signed"));

    // A second signature (key B) is appended: both keys verify, skopeo still accepts key A.
    let again = sign(&client, &layout, &signer_b, &signed, &d_signed);
    assert_eq!(again.signatures, 2);
    assert_eq!(tools.check("signed", "v1", &pub_a), Ok(()));
    let public_b = signer_b_public(&key_b);
    assert!(verify(&client, &layout, &signed, &public_b).is_ok());
    assert!(verify(&client, &layout, &signed, &public_a).is_ok());
}

fn signer_b_public(key: &Path) -> PublicKey {
    PrivateKey::load(key, None).unwrap().public_key()
}

/// cosign's own encrypted test key (password `hello`) signs; the tools accept it with its public
/// key; a wrong password fails with a message that shows neither password nor key.
#[test]
fn cosign_encrypted_key_signs_verifiably() {
    let reg = Registry::start();
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(dir.path().join("oci")).unwrap();
    let client = client();
    let key_file = dir.path().join("cosign.key");
    std::fs::write(
        &key_file,
        include_str!("../../src/sign/testdata/cosign-sigstore.key"),
    )
    .unwrap();

    let wrong = PrivateKey::load(&key_file, Some(&Secret::new("not-hello-pw"))).unwrap_err();
    let msg = format!("{wrong} {wrong:?}");
    assert!(msg.contains("wrong password"), "{msg}");
    assert!(
        !msg.contains("not-hello-pw") && !msg.contains("eyJrZGYi"),
        "{msg}"
    );
    assert_eq!(wrong.exit_code(), 2);
    let none = PrivateKey::load(&key_file, None).unwrap_err();
    assert!(none.to_string().contains("COSIGN_PASSWORD"), "{none}");

    let key = PrivateKey::load(&key_file, Some(&Secret::new("hello"))).unwrap();
    let pub_file = dir.path().join("cosign.pub");
    std::fs::write(&pub_file, key.public_key().to_pem()).unwrap();
    let (image, digest) = push_image(&client, &layout, &host, "cosign-key", "cosign key");
    sign(&client, &layout, &Signer::Key(key), &image, &digest);
    assert_eq!(
        ToolVerifier::new(&host, dir.path()).check("cosign-key", "v1", &pub_file),
        Ok(())
    );
    assert!(verify(
        &client,
        &layout,
        &image,
        &PublicKey::load(&pub_file).unwrap()
    )
    .is_ok());
}

/// Create an ECC_NIST_P256 signing key with an alias in moto's KMS; returns the key ARN.
pub(crate) fn moto_kms_key(moto: &Moto, alias: &str, spec: &str) -> String {
    let script = format!(
        r#"
import boto3
kms = boto3.client("kms", region_name="us-east-1", endpoint_url="{url}",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
k = kms.create_key(KeySpec="{spec}", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
kms.create_alias(AliasName="alias/{alias}", TargetKeyId=k["KeyId"])
print(k["Arn"])
"#,
        url = moto.url
    );
    let out = run(Command::new(VENV_PYTHON).args(["-c", &script]));
    assert!(
        out.status.success(),
        "KMS setup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// KMS signing through the SDK's default chain pointed at moto by `AWS_ENDPOINT_URL_KMS`
/// (a child process: environment variables are process-wide).
#[test]
fn kms_signatures_agree_with_independent_tools() {
    if std::env::var_os("WPIMG_KMS_CHILD").is_some() {
        return kms_child();
    }
    let moto = Moto::start();
    let arn = moto_kms_key(&moto, "wpimg-signing", "ECC_NIST_P256");
    let rsa = moto_kms_key(&moto, "wpimg-rsa", "RSA_2048");
    assert!(arn.starts_with("arn:aws:kms:us-east-1:"), "{arn}");
    let reg = Registry::start();
    let home = tempfile::tempdir().unwrap();
    let text = run_child_test(
        child_test(
            "sign::kms_signatures_agree_with_independent_tools",
            home.path(),
        )
        .env("WPIMG_KMS_CHILD", "1")
        .env("WPIMG_KMS_ARN", &arn)
        .env("WPIMG_KMS_RSA_ARN", &rsa)
        .env("WPIMG_REGISTRY", reg.host())
        .env("AWS_ENDPOINT_URL_KMS", &moto.url)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
        .env("AWS_REGION", "us-east-1"),
    );
    assert!(
        !text.contains("testing-secret-key"),
        "secret leaked:\n{text}"
    );
}

fn kms_child() {
    let host = std::env::var("WPIMG_REGISTRY").unwrap();
    let arn = std::env::var("WPIMG_KMS_ARN").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(dir.path().join("oci")).unwrap();
    let client = client();
    let rt = rt();

    // By alias (region from AWS_REGION) and by ARN (region from the ARN): the same key.
    let alias: KmsKeyRef = "awskms:///alias/wpimg-signing".parse().unwrap();
    let by_alias = rt.block_on(KmsSigner::new(alias, None, None)).unwrap();
    let by_arn: KmsKeyRef = format!("awskms:///{arn}").parse().unwrap();
    let by_arn = rt.block_on(KmsSigner::new(by_arn, None, None)).unwrap();
    let public = rt.block_on(by_alias.public_key()).unwrap();
    assert_eq!(rt.block_on(by_arn.public_key()).unwrap(), public);
    let pub_file = dir.path().join("kms.pub");
    std::fs::write(&pub_file, public.to_pem()).unwrap();

    let (signed, d_signed) = push_image(&client, &layout, &host, "kms-signed", "kms");
    let (unsigned, _) = push_image(&client, &layout, &host, "kms-unsigned", "unsigned");
    let (other, d_other) = push_image(&client, &layout, &host, "kms-other", "other key");
    let report = sign(&client, &layout, &Signer::Kms(by_alias), &signed, &d_signed);
    assert_eq!(report.signer, "awskms:///alias/wpimg-signing");
    let (other_key, _) = openssl_key(dir.path(), "other");
    sign(
        &client,
        &layout,
        &Signer::Key(PrivateKey::load(&other_key, None).unwrap()),
        &other,
        &d_other,
    );

    let tools = ToolVerifier::new(&host, dir.path());
    let cases = [
        ("kms-signed", Ok(())),
        ("kms-unsigned", Err("no signature")),
        ("kms-other", Err("wrong key")),
    ];
    for ((repo, expected), image) in cases.iter().zip([&signed, &unsigned, &other]) {
        assert_eq!(
            tools.check(repo, "v1", &pub_file),
            *expected,
            "{repo} by the tools"
        );
        let ours = verify(&client, &layout, image, &public)
            .map(|_| ())
            .map_err(|r| r.reason());
        assert_eq!(ours, *expected, "{repo} by wpimg");
    }

    // An RSA key cannot make cosign P-256 signatures: a clear error before anything is pushed.
    let rsa: KmsKeyRef = format!("awskms:///{}", std::env::var("WPIMG_KMS_RSA_ARN").unwrap())
        .parse()
        .unwrap();
    let rsa = rt.block_on(KmsSigner::new(rsa, None, None)).unwrap();
    let e = rt.block_on(rsa.public_key()).unwrap_err();
    assert!(e.to_string().contains("ECC_NIST_P256"), "{e}");
    // A key that does not exist: the KMS error code is in the message.
    let missing: KmsKeyRef = "awskms:///alias/does-not-exist".parse().unwrap();
    let missing = rt.block_on(KmsSigner::new(missing, None, None)).unwrap();
    let e = rt.block_on(missing.sign(b"x")).unwrap_err();
    assert!(e.to_string().contains("NotFound"), "{e}");
    eprintln!("kms child ok: {e}");
}

/// The SBOM goes under cosign's `.sbom` tag the way `cosign attach sbom` stores it; the OCI
/// 1.1 artifact (with `subject`) pushes by digest to a registry without the referrers API.
#[test]
fn sbom_attachments_push_to_a_plain_registry() {
    let reg = Registry::start();
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(dir.path().join("oci")).unwrap();
    let client = client();
    let (image, digest) = push_image(&client, &layout, &host, "with-sbom", "sbom");
    let desc = layout.resolve("with-sbom:v1").unwrap();
    let sbom = wpimg::sbom::generate(&layout, &desc, "with-sbom").unwrap();
    let doc = sbom.to_json(wpimg::sbom::Format::SpdxJson);

    rt().block_on(remote::push_sbom_tag(
        &client,
        &layout,
        &image,
        &digest,
        &doc,
        wpimg::sbom::Format::SpdxJson,
        &events::null(),
    ))
    .unwrap();
    let raw = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{host}/with-sbom:{}", cosign::sbom_tag(&digest)),
    ]));
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(m["layers"][0]["mediaType"], "text/spdx+json");
    let blob = ok_stdout(Command::new("curl").args([
        "-sfS",
        &format!(
            "http://{host}/v2/with-sbom/blobs/{}",
            m["layers"][0]["digest"].as_str().unwrap()
        ),
    ]));
    assert_eq!(blob.as_bytes(), doc.as_slice());

    let artifact = wpimg::sbom::artifact::write_sbom(
        &layout,
        &doc,
        wpimg::sbom::Format::SpdxJson,
        &desc,
        &sbom.subject.created,
    )
    .unwrap();
    let by_digest = image.with_digest(artifact.digest.clone());
    let by_digest = Reference {
        tag: None,
        ..by_digest
    };
    rt().block_on(client.push_image(&layout, &artifact, &by_digest, &[], &events::null()))
        .unwrap();
    let raw = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{host}/with-sbom@{}", artifact.digest),
    ]));
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(m["artifactType"], "application/spdx+json");
    assert_eq!(m["subject"]["digest"], digest.to_string());
}
