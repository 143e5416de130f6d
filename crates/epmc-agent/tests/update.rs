//! Self-update end to end against a real `epmc-server` in-process on random loopback ports:
//! releases are signed with a real ed25519 key and published with the server's own
//! `release` functions, fetched over HTTPS that trusts only the server's CA, and installed
//! into a temporary directory. The "agent binaries" are small shell scripts whose self-test
//! the test controls, plus the real `epmc-agent` binary.
#![cfg(unix)]

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use epmc_agent::config::HttpsUrl;
use epmc_agent::update::{
    BUILD_TARGET, Check, SelfTest, UpdateError, UpdateOutcome, Updater, previous_path,
};
use epmc_proto::release::{ReleaseManifest, ReleaseVersion, TargetTriple};
use epmc_server::datadir;
use epmc_server::release::{self, RELEASES_DIR, ReleaseKey};
use epmc_server::server::{ServeConfig, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOUND: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {BOUND:?}"))
}

fn v(s: &str) -> ReleaseVersion {
    s.parse().unwrap()
}

/// A shell script standing in for the agent: `self-test` prints `self_test_line` and exits
/// with `self_test_code`; anything else prints `says`.
fn script(says: &str, self_test_line: &str, self_test_code: i32) -> Vec<u8> {
    format!(
        "#!/bin/sh\nif [ \"$1\" = self-test ]; then echo '{self_test_line}'; echo 'self-test stderr' >&2; exit {self_test_code}; fi\necho '{says}'\n"
    )
    .into_bytes()
}

struct Fixture {
    dir: tempfile::TempDir,
    server: Server,
    key: ReleaseKey,
    ca_pem: String,
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
        let server = within("server start", Server::start(config)).await.unwrap();
        let ca_pem = datadir::load(&data).unwrap().ca.cert_pem();
        let (key, _) = ReleaseKey::generate().unwrap();
        std::fs::create_dir(dir.path().join("agent")).unwrap();
        Fixture {
            dir,
            server,
            key,
            ca_pem,
        }
    }

    fn releases(&self) -> PathBuf {
        self.dir.path().join("data").join(RELEASES_DIR)
    }

    fn url(&self) -> HttpsUrl {
        HttpsUrl {
            host: "localhost".into(),
            port: self.server.https_addr().port(),
        }
    }

    /// An updater pinned to this server's CA and trusting `self.key`, running `current`.
    fn updater(&self, current: &str) -> Updater {
        self.updater_at(self.url(), current)
    }

    fn updater_at(&self, url: HttpsUrl, current: &str) -> Updater {
        Updater::new(&url, self.ca_pem.as_bytes(), self.key.public_key(), None)
            .unwrap()
            .with_current_version(v(current))
    }

    /// The installed "agent": `agent/epmc-agent`, a script saying "v1".
    fn installed(&self) -> PathBuf {
        let bin = self.dir.path().join("agent").join("epmc-agent");
        if !bin.exists() {
            std::fs::write(&bin, script("v1", "epmc-agent 1.0.0 old", 0)).unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin
    }

    /// Signs `content` as `version` with `key` and publishes it for this build's target.
    fn publish_with(&self, key: &ReleaseKey, content: &[u8], version: &str) -> ReleaseManifest {
        let work = self.dir.path().join(format!("release-{version}"));
        std::fs::create_dir_all(&work).unwrap();
        let bin = work.join("epmc-agent");
        std::fs::write(&bin, content).unwrap();
        let signed = release::sign(
            key,
            &bin,
            v(version),
            TargetTriple::new(BUILD_TARGET).unwrap(),
            &work.join("signed"),
        )
        .unwrap();
        release::publish(
            &self.releases(),
            &signed.manifest_path,
            &signed.signature_path,
            &bin,
            None,
        )
        .unwrap();
        signed.manifest
    }

    fn publish(&self, content: &[u8], version: &str) -> ReleaseManifest {
        self.publish_with(&self.key, content, version)
    }

    fn stored(&self, version: &str, file: &str) -> PathBuf {
        self.releases().join(BUILD_TARGET).join(version).join(file)
    }
}

fn run(bin: &Path) -> String {
    let out = Command::new(bin).output().unwrap();
    assert!(out.status.success(), "{} did not run", bin.display());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Files the installer may have left beside the binary (temporary files start with '.').
fn leftovers(bin: &Path) -> Vec<String> {
    std::fs::read_dir(bin.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn quick_test() -> SelfTest {
    SelfTest {
        args: vec![],
        timeout: Duration::from_secs(20),
    }
}

/// The binary is untouched: same content, runs, says v1; nothing left behind.
fn assert_untouched(bin: &Path) {
    assert_eq!(run(bin), "v1");
    assert!(leftovers(bin).is_empty(), "{:?}", leftovers(bin));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_update_installs_and_keeps_the_previous_binary() {
    let f = Fixture::start().await;
    let bin = f.installed();
    let updater = f.updater("1.0.0");
    assert_eq!(
        within("check", updater.check()).await.unwrap(),
        Check::NotPublished
    );

    let new = script("v2", "epmc-agent 2.0.0 test: self-test ok", 0);
    let m = f.publish(&new, "2.0.0");
    match within("check", updater.check()).await.unwrap() {
        Check::Available { current, manifest } => {
            assert_eq!(current, v("1.0.0"));
            assert_eq!(manifest, m);
        }
        other => panic!("{other:?}"),
    }
    // --check downloads nothing.
    assert_untouched(&bin);

    let outcome = within("update", updater.update(&bin, &quick_test()))
        .await
        .unwrap();
    let UpdateOutcome::Installed { from, installed } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(from, v("1.0.0"));
    assert_eq!(installed.version, v("2.0.0"));
    assert_eq!(installed.binary, bin);
    assert_eq!(std::fs::read(&bin).unwrap(), new);
    assert_eq!(run(&bin), "v2");
    let mode = std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    assert_eq!(installed.previous, previous_path(&bin));
    assert_eq!(run(&installed.previous), "v1");
    assert!(leftovers(&bin).is_empty(), "{:?}", leftovers(&bin));

    // Running 2.0.0 now: the same release is not installed again.
    let again = within("update", f.updater("2.0.0").update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(matches!(again, UpdateError::NotNewer { .. }), "{again}");
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_is_refused() {
    let f = Fixture::start().await;
    let bin = f.installed();
    // Signed with a key the agent does not trust.
    let (other, _) = ReleaseKey::generate().unwrap();
    f.publish_with(&other, &script("evil", "epmc-agent 2.0.0", 0), "2.0.0");
    let e = within("update", f.updater("1.0.0").update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::Signature { .. }), "{e}");
    assert!(e.to_string().starts_with("signature:"), "{e}");
    assert_untouched(&bin);

    // Signed with the right key, then the manifest was changed on the server (a bigger
    // version, and the hash of another binary): the signature no longer covers it.
    let f = Fixture::start().await;
    let bin = f.installed();
    f.publish(&script("v2", "epmc-agent 2.0.0", 0), "2.0.0");
    let manifest = f.stored("2.0.0", "manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen("\"size\": ", "\"size\": 1", 1)).unwrap();
    let e = within("check", f.updater("1.0.0").check())
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::Signature { .. }), "{e}");
    assert_untouched(&bin);
    // The manifest restored, the signature replaced by a well-formed wrong one.
    std::fs::write(&manifest, text).unwrap();
    std::fs::write(
        f.stored("2.0.0", "manifest.json.sig"),
        format!("{}\n", "5a".repeat(64)),
    )
    .unwrap();
    let e = within("update", f.updater("1.0.0").update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::Signature { .. }), "{e}");
    assert_untouched(&bin);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_hash_is_refused() {
    let f = Fixture::start().await;
    let bin = f.installed();
    let good = script("v2", "epmc-agent 2.0.0", 0);
    f.publish(&good, "2.0.0");
    // The binary on the server replaced by another of the same size.
    let mut evil = good.clone();
    let at = evil.len() - 3;
    evil[at] ^= 0x20;
    std::fs::write(f.stored("2.0.0", "epmc-agent"), &evil).unwrap();
    let e = within("update", f.updater("1.0.0").update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::Hash { .. }), "{e}");
    assert!(e.to_string().starts_with("hash:"), "{e}");
    assert_untouched(&bin);
    assert!(!previous_path(&bin).exists());
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_or_the_same_version_is_refused() {
    let f = Fixture::start().await;
    let bin = f.installed();
    f.publish(&script("v0.9", "epmc-agent 0.9.0", 0), "0.9.0");
    let e = within("update", f.updater("1.0.0").update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(
        matches!(e, UpdateError::NotNewer { current, offered } if current == v("1.0.0") && offered == v("0.9.0")),
        "{e}"
    );
    assert!(e.to_string().contains("downgrade refused"), "{e}");
    assert_untouched(&bin);
    assert_eq!(
        within("check", f.updater("1.0.0").check()).await.unwrap(),
        Check::UpToDate {
            current: v("1.0.0"),
            published: v("0.9.0")
        }
    );

    f.publish(&script("v1 again", "epmc-agent 1.0.0", 0), "1.0.0");
    let e = within("update", f.updater("1.0.0").update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(
        matches!(e, UpdateError::NotNewer { current, offered } if current == offered),
        "{e}"
    );
    assert_untouched(&bin);
    // Numeric, not textual: 1.0.10 > 1.0.9.
    f.publish(&script("v1.0.10", "epmc-agent 1.0.10", 0), "1.0.10");
    assert!(matches!(
        within("check", f.updater("1.0.9").check()).await.unwrap(),
        Check::Available { .. }
    ));
    f.server.shutdown().await;
}

/// Forwards TCP to `upstream`, but closes each connection after `budget` bytes from the
/// server: a download cut off mid-way.
async fn cutting_proxy(upstream: SocketAddr, budget: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..16 {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut sent = 0;
                let mut buf = vec![0u8; 4096];
                while sent < budget {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(budget - sent),
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                let _ = cw.shutdown().await;
                up.abort();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_download_is_refused() {
    let f = Fixture::start().await;
    let bin = f.installed();
    // 1 MiB; the connection carries the TLS handshake, the manifest and 64 KiB at most.
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    f.publish(&big, "2.0.0");
    let proxy = cutting_proxy(f.server.https_addr(), 64 * 1024).await;
    let updater = f.updater_at(
        HttpsUrl {
            host: "localhost".into(),
            port: proxy.port(),
        },
        "1.0.0",
    );
    let e = within("update", updater.update(&bin, &quick_test()))
        .await
        .unwrap_err();
    match &e {
        UpdateError::Truncated {
            received, expected, ..
        } => {
            assert_eq!(*expected, 1 << 20);
            assert!(*received < 64 * 1024, "{e}");
        }
        other => panic!("expected a truncation, got {other}"),
    }
    assert!(e.to_string().contains("truncated download"), "{e}");
    assert_untouched(&bin);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_self_test_rolls_back() {
    let f = Fixture::start().await;
    let bin = f.installed();
    let old = std::fs::read(&bin).unwrap();

    // Exits non-zero.
    f.publish(&script("broken v2", "starting", 3), "2.0.0");
    let e = within("update", f.updater("1.0.0").update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, UpdateError::SelfTest { version, .. } if *version == v("2.0.0")),
        "{e}"
    );
    let text = e.to_string();
    assert!(text.starts_with("self-test:"), "{text}");
    assert!(text.contains("exit status: 3"), "{text}");
    assert!(text.contains("self-test stderr"), "{text}");
    assert!(text.contains("previous binary was restored"), "{text}");
    assert_eq!(std::fs::read(&bin).unwrap(), old);
    assert_untouched(&bin);

    // Passes, but is not the version the manifest names.
    f.publish(&script("v2.1", "epmc-agent 1.5.0 mislabelled", 0), "2.1.0");
    let e = within("update", f.updater("1.0.0").update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::SelfTest { .. }), "{e}");
    assert!(e.to_string().contains("epmc-agent 2.1.0"), "{e}");
    assert_untouched(&bin);

    // Hangs: killed at the timeout.
    f.publish(
        b"#!/bin/sh\nif [ \"$1\" = self-test ]; then exec sleep 30; fi\necho hung\n",
        "2.2.0",
    );
    let test = SelfTest {
        args: vec![],
        timeout: Duration::from_millis(500),
    };
    let started = std::time::Instant::now();
    let e = within("update", f.updater("1.0.0").update(&bin, &test))
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::SelfTest { .. }), "{e}");
    assert!(e.to_string().contains("killed"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_untouched(&bin);

    // Not a program at all.
    f.publish(b"\x7fELF garbage", "2.3.0");
    let e = within("update", f.updater("1.0.0").update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::SelfTest { .. }), "{e}");
    assert_untouched(&bin);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_pinned_ca_is_trusted() {
    let f = Fixture::start().await;
    let bin = f.installed();
    f.publish(&script("v2", "epmc-agent 2.0.0", 0), "2.0.0");
    // Another server's CA pinned: the connection is refused before anything is read.
    let other = tempfile::tempdir().unwrap();
    datadir::init(&other.path().join("d"), &[]).unwrap();
    let other_ca = datadir::load(&other.path().join("d"))
        .unwrap()
        .ca
        .cert_pem();
    let updater = Updater::new(&f.url(), other_ca.as_bytes(), f.key.public_key(), None)
        .unwrap()
        .with_current_version(v("1.0.0"));
    let e = within("update", updater.update(&bin, &quick_test()))
        .await
        .unwrap_err();
    assert!(matches!(e, UpdateError::Fetch { .. }), "{e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert_untouched(&bin);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_agent_binary_installs_and_passes_its_self_test() {
    let f = Fixture::start().await;
    let bin = f.installed();
    let real = std::fs::read(env!("CARGO_BIN_EXE_epmc-agent")).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    f.publish(&real, version);
    // A configuration the new binary's self-test must load.
    let config = f.dir.path().join("agent").join("agent.toml");
    write_config(&f, &config);
    let outcome = within(
        "update",
        f.updater("0.0.1")
            .update(&bin, &SelfTest::with_config(&config)),
    )
    .await
    .unwrap();
    assert!(
        matches!(&outcome, UpdateOutcome::Installed { installed, .. } if installed.version == v(version)),
        "{outcome:?}"
    );
    assert_eq!(std::fs::read(&bin).unwrap(), real);
    assert_eq!(run(&previous_path(&bin)), "v1");
    f.server.shutdown().await;
}

fn write_config(f: &Fixture, path: &Path) {
    std::fs::write(path.with_file_name("ca.crt"), &f.ca_pem).unwrap();
    let mut file = std::fs::File::create(path).unwrap();
    write!(
        file,
        "[server]\nurl = \"mqtts://localhost:{}\"\nca_cert = \"ca.crt\"\nclient_cert = \"agent.crt\"\nclient_key = \"agent.key\"\n\n[update]\nurl = \"https://localhost:{}\"\npublic_key = \"{}\"\n",
        f.server.mqtt_addr().expect("embedded endpoint").port(),
        f.server.https_addr().port(),
        f.key.public_key()
    )
    .unwrap();
}

#[test]
fn the_self_test_subcommand_reports_the_version_and_checks_the_configuration() {
    let out = Command::new(env!("CARGO_BIN_EXE_epmc-agent"))
        .arg("self-test")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "epmc-agent {} {BUILD_TARGET}: self-test ok",
            env!("CARGO_PKG_VERSION")
        )),
        "{stdout}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("agent.toml");
    std::fs::write(&bad, "[server]\nurl = 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_epmc-agent"))
        .args(["self-test", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("configuration"), "{stderr}");
    // Hidden from the help.
    let help = Command::new(env!("CARGO_BIN_EXE_epmc-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("update"), "{help}");
    assert!(!help.contains("self-test"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_update_command_checks_then_installs() {
    use clap::Parser;
    let f = Fixture::start().await;
    let bin = f.installed();
    let agent_dir = f.dir.path().join("agent");
    write_config(&f, &agent_dir.join("agent.toml"));
    let running = env!("CARGO_PKG_VERSION").parse::<ReleaseVersion>().unwrap();
    let (ma, mi, pa) = running.parts();
    let next = ReleaseVersion::new(ma, mi, pa + 1).to_string();
    f.publish(
        &script("next", &format!("epmc-agent {next} test"), 0),
        &next,
    );
    let cmd = |extra: &[&str]| {
        let mut args = vec![
            "epmc-agent".to_owned(),
            "update".into(),
            "--dir".into(),
            agent_dir.to_str().unwrap().into(),
            "--binary".into(),
            bin.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        epmc_agent::cli::Cli::try_parse_from(args).unwrap()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = within(
        "update --check",
        epmc_agent::cli::run(cmd(&["--check"]), &mut out, &mut err),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(
        text.contains(&format!("update available: {next} (running {running})")),
        "{text}"
    );
    assert_eq!(run(&bin), "v1");

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = within("update", epmc_agent::cli::run(cmd(&[]), &mut out, &mut err)).await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(
        text.contains(&format!("installed {next} (was {running})")),
        "{text}"
    );
    assert_eq!(run(&bin), "next");

    // A tampered signature: exit 1 and the reason.
    std::fs::write(
        f.stored(&next, "manifest.json.sig"),
        format!("{}\n", "00".repeat(64)),
    )
    .unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = within("update", epmc_agent::cli::run(cmd(&[]), &mut out, &mut err)).await;
    let text = String::from_utf8_lossy(&err);
    assert_eq!(code, 1);
    assert!(text.contains("refused: signature:"), "{text}");

    // No [update] section: a clear message.
    std::fs::write(
        agent_dir.join("agent.toml"),
        "[server]\nurl = \"mqtts://localhost\"\nca_cert = \"ca.crt\"\nclient_cert = \"a\"\nclient_key = \"k\"\n",
    )
    .unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = within("update", epmc_agent::cli::run(cmd(&[]), &mut out, &mut err)).await;
    assert_eq!(code, 1);
    let text = String::from_utf8_lossy(&err);
    assert!(text.contains("no [update] section"), "{text}");
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_loop_installs_a_release_when_it_appears_and_stops_on_request() {
    let f = Fixture::start().await;
    let bin = f.installed();
    let updater = f.updater("1.0.0");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = {
        let bin = bin.clone();
        tokio::spawn(async move {
            updater
                .watch(&bin, &quick_test(), Duration::from_millis(100), stop)
                .await
        })
    };
    // A few rounds find nothing; a refused release is skipped; a good one is installed.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(!task.is_finished());
    let (other, _) = ReleaseKey::generate().unwrap();
    f.publish_with(&other, &script("evil", "epmc-agent 1.5.0", 0), "1.5.0");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(!task.is_finished());
    assert_untouched(&bin);
    f.publish(&script("v2", "epmc-agent 2.0.0", 0), "2.0.0");
    let installed = within("watch", task).await.unwrap().unwrap();
    assert_eq!(installed.version, v("2.0.0"));
    assert_eq!(run(&bin), "v2");
    drop(stop_tx);

    // Stopped: returns None without another round.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let updater = f.updater("2.0.0");
    let task = tokio::spawn(async move {
        updater
            .watch(&bin, &quick_test(), Duration::from_secs(3600), stop)
            .await
    });
    stop_tx.send(true).unwrap();
    assert_eq!(within("stop", task).await.unwrap(), None);
    f.server.shutdown().await;
}
