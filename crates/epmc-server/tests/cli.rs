//! The operator's commands as the real binary runs them, on a SQLite data directory: `init
//! --hostname`, `tenant add`, `token create`, `agent issue|list|revoke`, `devices`, and the
//! errors that name the file, flag or value at fault.

use std::path::Path;
use std::process::{Command, Output};

use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

fn epmc(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_epmc-server"))
        .arg("--data")
        .arg(data)
        .env_remove("EPMC_DATABASE")
        .env_remove("EPMC_DATA")
        .env_remove("RUST_LOG")
        .args(args)
        .output()
        .expect("run epmc-server")
}

fn ok(data: &Path, args: &[&str]) -> String {
    let out = epmc(data, args);
    assert!(
        out.status.success(),
        "{args:?}: exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn refused(data: &Path, args: &[&str]) -> String {
    let out = epmc(data, args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn init_tenant_token_agent_and_devices_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");

    // A directory `init` did not make is refused by name, and left as it was.
    let err = refused(&data, &["tenant", "list"]);
    assert!(
        err.contains(&data.join("epmc.db").display().to_string()) && err.contains("init"),
        "{err}"
    );
    assert!(!data.exists(), "nothing created in a mistyped directory");

    // init --hostname: the server certificate carries the name, besides localhost and
    // 127.0.0.1; a second init changes nothing and says so.
    let first = ok(&data, &["init", "--hostname", "epmc.example.com"]);
    assert!(first.contains("created"), "{first}");
    let pem = std::fs::read(data.join("server.crt")).expect("server.crt");
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("PEM");
    let (_, cert) = X509Certificate::from_der(&der).expect("DER");
    let san = cert
        .subject_alternative_name()
        .expect("extension")
        .expect("a SAN");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_string(),
            GeneralName::IPAddress(ip) => format!("{ip:?}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert!(
        names.iter().any(|n| n == "epmc.example.com") && names.iter().any(|n| n == "localhost"),
        "{names:?}"
    );
    let again = ok(&data, &["init", "--hostname", "other.example.com"]);
    assert!(
        again.contains("already initialized; nothing changed"),
        "{again}"
    );
    assert_eq!(std::fs::read(data.join("server.crt")).unwrap(), pem);

    ok(&data, &["tenant", "add", "acme"]);
    assert!(ok(&data, &["tenant", "list"]).contains("\tacme"));

    // A token carries the CA's fingerprint (the agent pins the CA with it).
    let token = ok(
        &data,
        &["token", "create", "--tenant", "acme", "--expires", "1h"],
    );
    let token = token.trim();
    let fingerprint = epmc_server::datadir::load(&data)
        .expect("load")
        .ca
        .fingerprint()
        .to_hex();
    assert!(
        token.starts_with("epmc1.") && token.ends_with(&fingerprint),
        "{token}"
    );
    let err = refused(
        &data,
        &["token", "create", "--tenant", "acme", "--expires", "5x"],
    );
    assert!(err.contains("\"5x\"") && err.contains("--expires"), "{err}");
    let err = refused(&data, &["token", "create", "--tenant", "nope"]);
    assert!(err.contains("--tenant \"nope\""), "{err}");

    // agent issue writes the three files and prints the new agent's id.
    let out = dir.path().join("agent1");
    let issue: &[&str] = &[
        "agent",
        "issue",
        "--tenant",
        "acme",
        "--out",
        out.to_str().unwrap(),
    ];
    let id = ok(&data, issue);
    let id = id.trim();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id:?}");
    for file in ["ca.crt", "agent.crt", "agent.key"] {
        assert!(out.join(file).is_file(), "{file}");
    }
    // The same --out again: refused by file name, and no second agent is left behind.
    let err = refused(&data, issue);
    assert!(err.contains("ca.crt") || err.contains("agent."), "{err}");
    let list = ok(&data, &["agent", "list"]);
    assert_eq!(
        list,
        format!(
            "id\ttenant\tname\tstate\tversion\tlast seen\n{id}\tacme\t-\tnever connected\t-\t-\n"
        )
    );

    let revoked = ok(&data, &["agent", "revoke", id]);
    assert!(revoked.contains("revoked 1 certificate(s)"), "{revoked}");
    // The list says so, and filters by tenant.
    let list = ok(&data, &["agent", "list", "--tenant", "acme"]);
    assert!(
        list.contains(&format!("{id}\tacme\t-\trevoked\t")),
        "{list}"
    );
    ok(&data, &["tenant", "add", "other"]);
    assert_eq!(
        ok(&data, &["agent", "list", "--tenant", "other"])
            .lines()
            .count(),
        1,
        "the header only"
    );
    let err = refused(&data, &["agent", "list", "--tenant", "nope"]);
    assert!(err.contains("--tenant \"nope\""), "{err}");
    let err = refused(&data, &["agent", "revoke", "not-an-id"]);
    assert!(err.contains("\"not-an-id\""), "{err}");

    assert_eq!(
        ok(&data, &["devices", "--tenant", "acme", "--json"]).trim(),
        "[]"
    );
    let err = refused(&data, &["devices", "--tenant", "nope"]);
    assert!(err.contains("--tenant \"nope\""), "{err}");

    // A one-shot command prints its answer and no log lines (`serve` logs at info).
    let out = epmc(&data, &["tenant", "list"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    // Asked for its log, it writes it without colour codes into a pipe (a journal or a log
    // file would keep them).
    let out = Command::new(env!("CARGO_BIN_EXE_epmc-server"))
        .arg("--data")
        .arg(&data)
        .args(["tenant", "list"])
        .env("RUST_LOG", "debug")
        .output()
        .expect("run epmc-server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DEBUG"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );

    // Its reader gone (`| head`): it ends quietly, without a panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_epmc-server"))
        .arg("--data")
        .arg(&data)
        .args(["tenant", "list"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run epmc-server");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert!(out.status.success(), "{:?}", out.status);
}

/// `order send … source_change NAME` takes the code from the inputs the device listed in its
/// latest full collection; an unknown name lists them, and a device that listed none asks for
/// the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_change_takes_an_input_by_the_name_the_device_lists() {
    use epmc_proto::model::{DeviceSnapshot, DeviceStatus, FullCollection};
    use epmc_proto::order::OrderAction;
    use epmc_proto::topic::Channel;
    use epmc_proto::{Envelope, Message, sample};
    use epmc_server::store::{IngestItem, OrderState, Store, StoreOptions};

    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    ok(&data, &["init"]);
    let store = Store::open_data_dir(&data, StoreOptions::default())
        .await
        .expect("store");
    let tenant = store.admin().add_tenant("acme").await.expect("tenant");
    let agent = store
        .admin()
        .create_agent(tenant, "hall")
        .await
        .expect("agent");
    // One device with a full collection (its inputs: HDMI1 30, HDMI2 A0, LAN 53), one with
    // only a snapshot.
    let listed: FullCollection = sample::collection(1);
    let bare = Message::Snapshot(DeviceSnapshot {
        device_id: "X8JK0000002".try_into().expect("id"),
        observed_at: epmc_proto::bounded::Timestamp::now(),
        status: DeviceStatus::default(),
    });
    let items = [Message::Collection(Box::new(listed)), bare].map(|m| {
        IngestItem::new(
            agent,
            Channel::Telemetry,
            Envelope::new(m).to_json().expect("json"),
        )
    });
    store.ingest().ingest_batch(&items).await.expect("ingest");
    let devices = store.admin().devices().await.expect("devices");
    let id_of = |key: &str| {
        devices
            .iter()
            .find(|d| d.key == key)
            .map(|d| d.id.to_string())
            .expect("device")
    };
    let (with_inputs, without) = (id_of("X8JK0000001"), id_of("X8JK0000002"));
    store.close().await;
    // `order send --device DEVICE source_change VALUE`, waiting a second for a result that
    // cannot come (no agent runs).
    let source_change = |device: &str, value: &str| {
        epmc(
            &data,
            &[
                "order",
                "send",
                "--device",
                device,
                "source_change",
                value,
                "--wait",
                "1s",
            ],
        )
    };
    let refused_with = |device: &str, value: &str| {
        let out = source_change(device, value);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // By name, in any case: queued with the listed code (no agent runs, so no result).
    let out = source_change(&with_inputs, "hdmi2");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let order: uuid::Uuid = stdout
        .strip_prefix("order ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    let store = Store::open_data_dir(&data, StoreOptions::default())
        .await
        .expect("store");
    let record = store.orders().get(order).await.expect("order");
    store.close().await;
    match record.action {
        OrderAction::SourceChange { source } => assert_eq!(source.get(), 0xA0),
        other => panic!("{other:?}"),
    }
    assert_eq!(record.state, OrderState::Queued);

    // A name the device does not list: refused, with what it has.
    let err = refused_with(&with_inputs, "HDMI9");
    assert!(
        err.contains("\"HDMI9\"") && err.contains("HDMI1 (30), HDMI2 (A0), LAN (53)"),
        "{err}"
    );
    // A device that listed no inputs: the code is needed, and it still works.
    let err = refused_with(&without, "HDMI2");
    assert!(err.contains("has not listed its inputs"), "{err}");
    let out = source_change(&without, "A0");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("order "),
        "{out:?}"
    );

    // The agent says it cannot reach the second device: `devices` says so instead of "ok".
    let store = Store::open_data_dir(&data, StoreOptions::default())
        .await
        .expect("store");
    let event = Message::Event(epmc_proto::model::DeviceEvent {
        device_id: "X8JK0000002".try_into().expect("id"),
        at: epmc_proto::bounded::Timestamp::now(),
        event: epmc_proto::model::DeviceEventKind::Unreachable {
            reason: "connection refused".try_into().expect("reason"),
        },
    });
    store
        .ingest()
        .ingest_batch(&[IngestItem::new(
            agent,
            Channel::Events,
            Envelope::new(event).to_json().expect("json"),
        )])
        .await
        .expect("ingest");
    store.close().await;
    let table = ok(&data, &["devices"]);
    let row = table
        .lines()
        .find(|l| l.contains("X8JK0000002"))
        .expect("row");
    assert!(
        row.contains("\tunreachable since ") && row.contains(": connection refused\t"),
        "{row}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&data, &["devices", "--json"])).expect("json");
    let reasons: Vec<&serde_json::Value> = json
        .as_array()
        .expect("list")
        .iter()
        .map(|d| &d["unreachable"]["reason"])
        .collect();
    assert_eq!(
        reasons,
        [
            &serde_json::Value::Null,
            &serde_json::json!("connection refused")
        ]
    );

    // Its agent gone: nothing newer can come, and every row says so first.
    let store = Store::open_data_dir(&data, StoreOptions::default())
        .await
        .expect("store");
    let at = epmc_proto::bounded::Timestamp::now();
    store
        .ingest()
        .set_offline(agent, at)
        .await
        .expect("offline");
    store.close().await;
    let table = ok(&data, &["devices"]);
    assert_eq!(
        table.matches("\tagent offline since ").count(),
        2,
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&data, &["devices", "--json"])).expect("json");
    assert_eq!(json[0]["agent_state"], "offline");
    ok(&data, &["agent", "revoke", &agent.to_string()]);
    let table = ok(&data, &["devices", "--tenant", "acme"]);
    assert_eq!(table.matches("\tagent revoked ").count(), 2, "{table}");

    // One device in full: every part its agent reported, by wire name.
    let shown = ok(&data, &["device", &with_inputs]);
    assert!(
        shown.starts_with(&format!("device {with_inputs}  X8JK0000001  ")),
        "{shown}"
    );
    for line in [
        &format!("  agent {:<28} {agent} (revoked)\n", ""),
        "\ninformation\n",
        "  model                              EB-PU2220B\n",
        "  lens_type                          ELPLM15\n",
        "\nsettings\n",
        "\nlogs\n",
        "  error_count                        3\n",
        "\nevents (latest 0)\n",
    ] {
        assert!(shown.contains(line), "{line:?} missing from\n{shown}");
    }
    assert!(shown.contains("\"HDMI2\""), "the inputs: {shown}");
    let shown = ok(&data, &["device", &without]);
    assert!(
        shown.contains("\ninformation\n  (not reported)\n")
            && shown.contains("unreachable ")
            && !shown.contains("Unreachable"),
        "{shown}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&data, &["device", &with_inputs, "--json"])).expect("json");
    assert_eq!(json["info"]["model"], "EB-PU2220B");
    assert_eq!(json["info"]["sources"][1]["name"], "HDMI2");
    assert_eq!(json["agent_state"], "revoked");
    let err = refused(&data, &["device", "999"]);
    assert!(err.contains("device 999"), "{err}");
}
