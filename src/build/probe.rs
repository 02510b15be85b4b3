//! Whether an engine can run a platform's containers, checked before a multi-platform build:
//! a probe image (one static executable of a few dozen bytes that exits 0, made here for the
//! platform's architecture) is loaded, run to its end and removed, with its container.
//!
//! A foreign architecture runs only through the kernel's binfmt handlers (qemu-user-static,
//! registered with the F flag so the interpreter is reachable inside containers).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::oci::{self, Digest, ImageConfig, Platform, RootFs, RuntimeConfig};
use crate::runtime::{ContainerSpec, Engine, RunOutcome, RuntimeError, BUILD_LABEL};

/// Label on probe images and containers.
pub const PROBE_LABEL: &str = "io.wpimg.probe";
/// How long a probe container may take (an emulated start takes well under a second).
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The engine ran the platform's probe.
    Runs,
    /// The engine could not run it: why (the container's output or the engine's answer).
    CannotRun(String),
    /// wpimg has no probe executable for the architecture (the build itself will tell).
    Unknown,
}

/// Run the probe of `platform` on `engine`; nothing is left behind (container and image are
/// removed, also when the run fails or is cancelled).
pub async fn probe(engine: &Arc<dyn Engine>, platform: &Platform) -> Result<Probe, RuntimeError> {
    let Some(exe) = executable(platform) else {
        return Ok(Probe::Unknown);
    };
    let nonce = format!("{:016x}", fastrand::u64(..));
    let image = ProbeImage::new(platform, exe, &nonce);
    let spec = ContainerSpec {
        image: image.id(),
        name: format!("wpimg-probe-{}-{nonce}", platform.architecture),
        labels: HashMap::from([
            (BUILD_LABEL.to_string(), "1".to_string()),
            (PROBE_LABEL.to_string(), platform.to_string()),
        ]),
        platform: Some(platform.to_string()),
        volumes: Vec::new(),
    };
    let mut leftovers = Leftovers {
        engine: engine.clone(),
        container: spec.name.clone(),
        image: image.id(),
        armed: true,
    };
    let chunk: std::io::Result<Bytes> = Ok(Bytes::from(image.archive()?));
    engine
        .load(Box::pin(futures_util::stream::iter([chunk])))
        .await?;
    let ran = engine.run_to_end(&spec, PROBE_TIMEOUT).await;
    let removed = engine.remove_image(&image.id()).await;
    leftovers.armed = ran.is_err() || removed.is_err();
    let RunOutcome { exit_code, output } = ran?;
    removed?;
    Ok(match exit_code {
        Some(0) => Probe::Runs,
        Some(code) if output.is_empty() => Probe::CannotRun(format!("exit code {code}")),
        Some(code) => Probe::CannotRun(format!("exit code {code}: {output}")),
        None => Probe::CannotRun(output),
    })
}

/// What a probe may leave in the engine when it fails or is cancelled half-way: removed in the
/// background when dropped armed.
struct Leftovers {
    engine: Arc<dyn Engine>,
    container: String,
    image: String,
    armed: bool,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let engine = self.engine.clone();
            let (container, image) = (self.container.clone(), self.image.clone());
            rt.spawn(async move {
                let _ = engine.remove(&container).await;
                let _ = engine.remove_image(&image).await;
            });
        }
    }
}

/// The name of qemu's binfmt handler for a platform (`/proc/sys/fs/binfmt_misc/qemu-NAME`).
pub fn qemu_handler(platform: &Platform) -> String {
    let arch = match platform.architecture.as_str() {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "386" => "i386",
        "mips64le" => "mips64el",
        "loong64" => "loongarch64",
        other => other,
    };
    format!("qemu-{arch}")
}

/// The probe image: config and one uncompressed layer holding `/probe`, in memory.
struct ProbeImage {
    config: Vec<u8>,
    layer: Vec<u8>,
}

impl ProbeImage {
    fn new(platform: &Platform, exe: Vec<u8>, nonce: &str) -> Self {
        let layer = layer_tar(&exe);
        let config = ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            variant: platform.variant.clone(),
            config: RuntimeConfig {
                entrypoint: Some(vec!["/probe".into()]),
                // A label unique to this run: its own image ID, removed by this run only.
                labels: Some(BTreeMap::from([(
                    PROBE_LABEL.to_string(),
                    nonce.to_string(),
                )])),
                ..Default::default()
            },
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: vec![Digest::of_bytes(&layer)],
            },
            ..Default::default()
        };
        Self {
            config: oci::to_canonical_json(&config),
            layer,
        }
    }

    /// The engine's ID of the image (its config digest).
    fn id(&self) -> String {
        Digest::of_bytes(&self.config).to_string()
    }

    /// A docker archive (`docker load`) of the image, untagged.
    fn archive(&self) -> std::io::Result<Vec<u8>> {
        let config_name = format!("{}.json", Digest::of_bytes(&self.config).hex());
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": [],
            "Layers": ["probe/layer.tar"],
        }]);
        let manifest = serde_json::to_vec(&manifest).map_err(std::io::Error::other)?;
        let mut b = tar::Builder::new(Vec::new());
        for (name, data, mode) in [
            (config_name.as_str(), &self.config[..], 0o644),
            ("probe/layer.tar", &self.layer[..], 0o644),
            ("manifest.json", &manifest[..], 0o644),
        ] {
            b.append_data(&mut header(data.len(), mode), name, data)?;
        }
        b.into_inner()
    }
}

fn header(size: usize, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

/// A layer holding the executable as `/probe`.
fn layer_tar(exe: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    // Writing into a Vec cannot fail.
    let _ = b.append_data(&mut header(exe.len(), 0o755), "probe", exe);
    b.into_inner().unwrap_or_default()
}

/// How to make an executable for one architecture: its ELF identity and machine code that
/// calls `exit(0)`.
struct Target {
    elf64: bool,
    big_endian: bool,
    machine: u16,
    flags: u32,
    code: Vec<u8>,
}

/// Little-endian 32-bit instruction words as bytes.
fn words_le(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn target(platform: &Platform) -> Option<Target> {
    let t = |elf64, big_endian, machine, flags, code| Target {
        elf64,
        big_endian,
        machine,
        flags,
        code,
    };
    Some(match platform.architecture.as_str() {
        // mov edi, 0; mov eax, 60 (exit); syscall
        "amd64" => t(
            true,
            false,
            62,
            0,
            vec![0xbf, 0, 0, 0, 0, 0xb8, 60, 0, 0, 0, 0x0f, 0x05],
        ),
        // mov ebx, 0; mov eax, 1 (exit); int 0x80
        "386" => t(
            false,
            false,
            3,
            0,
            vec![0xbb, 0, 0, 0, 0, 0xb8, 1, 0, 0, 0, 0xcd, 0x80],
        ),
        // mov x0, #0; mov x8, #93 (exit); svc #0
        "arm64" => t(
            true,
            false,
            183,
            0,
            words_le(&[0xd280_0000, 0xd280_0ba8, 0xd400_0001]),
        ),
        // mov r0, #0; mov r7, #1 (exit); svc #0 — EABI version 5
        "arm" => t(
            false,
            false,
            40,
            0x0500_0000,
            words_le(&[0xe3a0_0000, 0xe3a0_7001, 0xef00_0000]),
        ),
        // li a0, 0; li a7, 93 (exit); ecall
        "riscv64" => t(
            true,
            false,
            243,
            0,
            words_le(&[0x0000_0513, 0x05d0_0893, 0x0000_0073]),
        ),
        // li r3, 0; li r0, 1 (exit); sc — ELFv2 ABI
        "ppc64le" => t(
            true,
            false,
            21,
            2,
            words_le(&[0x3860_0000, 0x3800_0001, 0x4400_0002]),
        ),
        // lghi %r2, 0; svc 1 (exit)
        "s390x" => t(true, true, 22, 0, vec![0xa7, 0x29, 0, 0, 0x0a, 0x01]),
        _ => return None,
    })
}

/// A static executable for `platform` (Linux only) that exits 0, or `None` when wpimg has none
/// for its architecture.
pub fn executable(platform: &Platform) -> Option<Vec<u8>> {
    if platform.os != "linux" {
        return None;
    }
    target(platform).map(|t| t.elf())
}

impl Target {
    /// An ELF executable: header, one loadable segment (the whole file), the code.
    fn elf(&self) -> Vec<u8> {
        const BASE: u64 = 0x40_0000;
        let (ehsize, phsize) = if self.elf64 { (64, 56) } else { (52, 32) };
        let entry = BASE + ehsize + phsize;
        let total = ehsize + phsize + self.code.len() as u64;
        let mut w = Writer {
            out: Vec::with_capacity(total as usize),
            big_endian: self.big_endian,
            elf64: self.elf64,
        };
        let class = if self.elf64 { 2 } else { 1 };
        let data = if self.big_endian { 2 } else { 1 };
        w.out
            .extend_from_slice(&[0x7f, b'E', b'L', b'F', class, data, 1, 0]);
        w.out.extend_from_slice(&[0; 8]);
        w.u16(2); // ET_EXEC
        w.u16(self.machine);
        w.u32(1); // EV_CURRENT
        w.addr(entry);
        w.addr(ehsize); // program headers right after this header
        w.addr(0); // no section headers
        w.u32(self.flags);
        w.u16(ehsize as u16);
        w.u16(phsize as u16);
        w.u16(1);
        w.u16(0);
        w.u16(0);
        w.u16(0);
        const PT_LOAD: u32 = 1;
        const PF_R_X: u32 = 5;
        w.u32(PT_LOAD);
        if self.elf64 {
            w.u32(PF_R_X);
        }
        w.addr(0); // offset
        w.addr(BASE); // vaddr
        w.addr(BASE); // paddr
        w.addr(total); // filesz
        w.addr(total); // memsz
        if !self.elf64 {
            w.u32(PF_R_X);
        }
        w.addr(0x1000); // align
        w.out.extend_from_slice(&self.code);
        w.out
    }
}

/// Writes ELF fields in the target's byte order and word size.
struct Writer {
    out: Vec<u8>,
    big_endian: bool,
    elf64: bool,
}

impl Writer {
    fn u16(&mut self, v: u16) {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.out.extend_from_slice(&b);
    }

    fn u32(&mut self, v: u32) {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.out.extend_from_slice(&b);
    }

    /// An address or offset: 8 bytes in ELF64, 4 in ELF32.
    fn addr(&mut self, v: u64) {
        match (self.elf64, self.big_endian) {
            (true, true) => self.out.extend_from_slice(&v.to_be_bytes()),
            (true, false) => self.out.extend_from_slice(&v.to_le_bytes()),
            (false, true) => self.out.extend_from_slice(&(v as u32).to_be_bytes()),
            (false, false) => self.out.extend_from_slice(&(v as u32).to_le_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn executables_have_the_elf_identity_qemu_matches() {
        let arm64 = executable(&p("linux/arm64")).unwrap();
        // qemu-user-static's aarch64 magic: ELF64, little-endian, ET_EXEC, EM_AARCH64.
        assert_eq!(&arm64[..7], b"\x7fELF\x02\x01\x01");
        assert_eq!(&arm64[16..20], &[2, 0, 0xb7, 0]);
        assert_eq!(arm64.len(), 64 + 56 + 12);
        let s390x = executable(&p("linux/s390x")).unwrap();
        assert_eq!(&s390x[..7], b"\x7fELF\x02\x02\x01");
        assert_eq!(&s390x[16..20], &[0, 2, 0, 22]);
        let arm = executable(&p("linux/arm/v7")).unwrap();
        assert_eq!(&arm[..7], b"\x7fELF\x01\x01\x01");
        assert_eq!(arm.len(), 52 + 32 + 12);
        // The entry point is the code right after the headers.
        assert_eq!(
            u32::from_le_bytes(arm[24..28].try_into().unwrap()),
            0x40_0000 + 84
        );
        assert!(executable(&p("linux/mips64le")).is_none());
        assert!(executable(&p("windows/amd64")).is_none());
    }

    #[test]
    fn the_amd64_probe_runs_here() {
        if Platform::host().architecture != "amd64" {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("probe");
        std::fs::write(&path, executable(&p("linux/amd64")).unwrap()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let status = std::process::Command::new(&path).status().unwrap();
        assert_eq!(status.code(), Some(0));
    }

    #[test]
    fn probe_images_are_unique_per_run() {
        let exe = executable(&p("linux/arm64")).unwrap();
        let a = ProbeImage::new(&p("linux/arm64"), exe.clone(), "a");
        let b = ProbeImage::new(&p("linux/arm64"), exe, "b");
        assert_ne!(a.id(), b.id());
        let config: serde_json::Value = serde_json::from_slice(&a.config).unwrap();
        assert_eq!(config["architecture"], "arm64");
        assert_eq!(config["config"]["Entrypoint"][0], "/probe");
        let mut names = Vec::new();
        let archive = a.archive().unwrap();
        for e in tar::Archive::new(&archive[..]).entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        assert_eq!(names[1..], ["probe/layer.tar", "manifest.json"]);
        assert_eq!(qemu_handler(&p("linux/arm64")), "qemu-aarch64");
    }
}
