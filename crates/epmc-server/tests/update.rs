//! Agent releases on the server: the `release` commands of the real binary (keygen, sign,
//! publish) and the HTTPS update routes of an in-process server on a random loopback port,
//! including requests that try to leave the releases folder.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use epmc_proto::release::{ReleaseManifest, ReleasePublicKey, SignedManifest, TargetTriple};
use epmc_server::datadir;
use epmc_server::release::{self, RELEASES_DIR, ReleaseKey};
use epmc_server::server::{ServeConfig, Server};

const BOUND: Duration = Duration::from_secs(20);
const TARGET: &str = "x86_64-unknown-linux-gnu";

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {BOUND:?}"))
}

struct Fixture {
    dir: tempfile::TempDir,
    server: Server,
    http: reqwest::Client,
}

impl Fixture {
    async fn start() -> Fixture {
        epmc_server::ca::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        datadir::init(&data, &[]).unwrap();
        let mut config = ServeConfig::new(&data);
        config.mqtt = "127.0.0.1:0".parse().unwrap();
        config.https = "127.0.0.1:0".parse().unwrap();
        let server = Server::start(config).await.unwrap();
        let ca_pem = datadir::load(&data).unwrap().ca.cert_pem();
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
            .no_proxy()
            .build()
            .unwrap();
        Fixture { dir, server, http }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self, path: &str) -> String {
        format!(
            "https://localhost:{}{path}",
            self.server.https_addr().port()
        )
    }

    async fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let r = within(path, self.http.get(self.url(path)).send())
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, within(path, r.bytes()).await.unwrap().to_vec())
    }

    /// Signs `content` as `version` with `key` and publishes it.
    fn publish(&self, key: &ReleaseKey, content: &[u8], version: &str) -> ReleaseManifest {
        let work = self.dir.path().join(format!("work-{version}"));
        std::fs::create_dir_all(&work).unwrap();
        let bin = work.join("epmc-agent");
        std::fs::write(&bin, content).unwrap();
        let signed = release::sign(
            key,
            &bin,
            version.parse().unwrap(),
            TargetTriple::new(TARGET).unwrap(),
            &work.join("signed"),
        )
        .unwrap();
        release::publish(
            &self.data().join(RELEASES_DIR),
            &signed.manifest_path,
            &signed.signature_path,
            &bin,
            Some(&key.public_key()),
        )
        .unwrap();
        signed.manifest
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_and_binary_are_served_exactly_as_published() {
    let f = Fixture::start().await;
    let manifest_path = format!("/api/v1/update/manifest?target={TARGET}");
    let (status, body) = f.get(&manifest_path).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("no release is published"));

    let (key, _) = ReleaseKey::generate().unwrap();
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let m1 = f.publish(&key, &content, "1.0.0");

    let (status, body) = f.get(&manifest_path).await;
    assert_eq!(status, 200);
    let signed = SignedManifest::from_json(&body).unwrap();
    assert_eq!(signed.manifest.as_bytes(), &m1.to_bytes()[..]);
    assert!(release::verify(
        &key.public_key(),
        signed.manifest.as_bytes(),
        &signed.signature().unwrap()
    ));

    let (status, body) = f
        .get(&format!("/api/v1/update/binary/1.0.0/{TARGET}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, content);
    // Served from memory the second time: the same bytes.
    let (_, again) = f
        .get(&format!("/api/v1/update/binary/1.0.0/{TARGET}"))
        .await;
    assert_eq!(again, content);

    // A newer release becomes the manifest served; the old binary stays reachable.
    let m2 = f.publish(&key, b"version two", "1.1.0");
    let (_, body) = f.get(&manifest_path).await;
    let signed = SignedManifest::from_json(&body).unwrap();
    assert_eq!(
        ReleaseManifest::from_bytes(signed.manifest.as_bytes()).unwrap(),
        m2
    );
    let (status, body) = f
        .get(&format!("/api/v1/update/binary/1.1.0/{TARGET}"))
        .await;
    assert_eq!((status, body.as_slice()), (200, &b"version two"[..]));

    // Unknown version, unknown target: 404.
    let (status, _) = f
        .get(&format!("/api/v1/update/binary/1.2.0/{TARGET}"))
        .await;
    assert_eq!(status, 404);
    let (status, _) = f
        .get("/api/v1/update/manifest?target=aarch64-apple-darwin")
        .await;
    assert_eq!(status, 404);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cannot_leave_the_releases_folder() {
    let f = Fixture::start().await;
    let (key, _) = ReleaseKey::generate().unwrap();
    f.publish(&key, b"binary", "1.0.0");
    // Something worth stealing one and two levels up.
    for (path, want) in [
        ("/api/v1/update/manifest?target=..", 400),
        ("/api/v1/update/manifest?target=%2e%2e%2f%2e%2e", 400),
        (
            "/api/v1/update/manifest?target=x86_64-unknown-linux-gnu%2f1.0.0",
            400,
        ),
        ("/api/v1/update/manifest", 400),
        // The client's URL parser may normalise these away (then: 404).
        ("/api/v1/update/binary/1.0.0/%2e%2e", 404),
        ("/api/v1/update/binary/%2e%2e/x86_64-unknown-linux-gnu", 404),
        ("/api/v1/update/binary/1.0.0%2f..%2f..%2f..%2fca.key/x", 400),
        ("/api/v1/update/binary/1.0/x86_64-unknown-linux-gnu", 400),
        ("/api/v1/update/binary/01.0.0/x86_64-unknown-linux-gnu", 400),
    ] {
        let (status, body) = f.get(path).await;
        let ok = status == want || (want == 404 && status == 400);
        assert!(ok, "{path}: {status} {}", String::from_utf8_lossy(&body));
        assert!(
            !String::from_utf8_lossy(&body).contains("PRIVATE KEY"),
            "{path} leaked a key"
        );
    }
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_that_no_longer_matches_its_manifest_size_is_not_served() {
    let f = Fixture::start().await;
    let (key, _) = ReleaseKey::generate().unwrap();
    f.publish(&key, b"0123456789", "1.0.0");
    let stored = f
        .data()
        .join(RELEASES_DIR)
        .join(TARGET)
        .join("1.0.0")
        .join("epmc-agent");
    std::fs::write(&stored, b"01234").unwrap();
    let (status, body) = f
        .get(&format!("/api/v1/update/binary/1.0.0/{TARGET}"))
        .await;
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    // Repaired on disk: served again (a failed read is not cached).
    std::fs::write(&stored, b"0123456789").unwrap();
    let (status, body) = f
        .get(&format!("/api/v1/update/binary/1.0.0/{TARGET}"))
        .await;
    assert_eq!((status, body.as_slice()), (200, &b"0123456789"[..]));
    f.server.shutdown().await;
}

fn epmc_server(data: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_epmc-server"))
        .arg("--data")
        .arg(data)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn release_commands_keygen_sign_publish() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = dir.path().join("offline").join("release.key");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    let key_s = key.to_str().unwrap();

    let (code, out, err) = epmc_server(&data, &["release", "keygen", "--out", key_s]);
    assert_eq!(code, 0, "{err}");
    let public: ReleasePublicKey = out
        .lines()
        .find(|l| l.starts_with("ed25519:"))
        .unwrap_or_else(|| panic!("no public key in {out:?}"))
        .parse()
        .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert_eq!(ReleaseKey::load(&key).unwrap().public_key(), public);
    let (code, _, err) = epmc_server(&data, &["release", "keygen", "--out", key_s]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");

    let bin = dir.path().join("epmc-agent");
    std::fs::write(&bin, b"#!/bin/sh\necho hi\n").unwrap();
    let signed = dir.path().join("signed");
    let sign = |version: &str| {
        epmc_server(
            &data,
            &[
                "release",
                "sign",
                "--key",
                key_s,
                "--binary",
                bin.to_str().unwrap(),
                "--version",
                version,
                "--target",
                TARGET,
                "--out",
                signed.join(version).to_str().unwrap(),
            ],
        )
    };
    let (code, out, err) = sign("1.2.3");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("signed x86_64-unknown-linux-gnu 1.2.3 (18 bytes"),
        "{out}"
    );
    let (code, _, err) = sign("1.2");
    assert_eq!(code, 2, "clap refuses a malformed version: {err}");
    assert!(err.contains("MAJOR.MINOR.PATCH"), "{err}");

    let manifest = signed.join("1.2.3").join("manifest.json");
    let publish = |extra: &[&str]| {
        let mut args = vec![
            "release",
            "publish",
            "--manifest",
            manifest.to_str().unwrap(),
            "--binary",
            bin.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        epmc_server(&data, &args)
    };
    // With another public key: refused, nothing published.
    let (other, _) = ReleaseKey::generate().unwrap();
    let other = other.public_key().to_string();
    let (code, _, err) = publish(&["--public-key", &other]);
    assert_eq!(code, 1);
    assert!(err.contains("does not verify"), "{err}");
    assert!(!data.join(RELEASES_DIR).join(TARGET).join("1.2.3").exists());

    let public_s = public.to_string();
    let (code, out, err) = publish(&["--public-key", &public_s]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("published x86_64-unknown-linux-gnu 1.2.3"),
        "{out}"
    );
    assert!(out.contains("signature verified"), "{out}");
    let (code, _, err) = publish(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("already published"), "{err}");

    // The private key is nowhere in the data directory.
    let key_pem = std::fs::read_to_string(&key).unwrap();
    for entry in walk(&data) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(key_pem.trim()),
            "{} holds the release key",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}
