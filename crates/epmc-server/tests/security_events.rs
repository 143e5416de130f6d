//! `epmc-server security-events`: the latest security events from the database, newest first,
//! as a table (one line each, control characters escaped) or as JSON. The real binary on a
//! SQLite data directory.

use std::path::Path;
use std::process::{Command, Output};

use epmc_proto::topic::AgentId;
use epmc_server::store::{Store, StoreOptions};

fn epmc(data: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_epmc-server"))
        .arg("--data")
        .arg(data)
        .env_remove("EPMC_DATABASE")
        .args(args)
        .output()
        .expect("run epmc-server");
    assert!(
        out.status.success(),
        "{args:?}: exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn lists_the_latest_events_newest_first_as_a_table_or_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    epmc(&data, &["init"]);
    let agent = AgentId::new(uuid::Uuid::new_v4());
    let store = Store::open_data_dir(&data, StoreOptions::default())
        .await
        .expect("store");
    let ingest = store.ingest();
    ingest
        .record_security_event("connection_limit", None, Some("127.0.0.1:4000"), "refused")
        .await
        .expect("record");
    ingest
        .record_security_event(
            "client_id_mismatch",
            Some(agent),
            Some("127.0.0.1:4001"),
            "client id \"x\"",
        )
        .await
        .expect("record");
    ingest
        .record_security_event(
            "tls_untrusted_certificate",
            None,
            Some("127.0.0.1:4002"),
            "claimed subject \"evil\n\u{1b}[2J\"",
        )
        .await
        .expect("record");
    store.close().await;

    let table =
        String::from_utf8(epmc(&data, &["security-events", "--limit", "2"]).stdout).expect("utf-8");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two events: {table}");
    assert!(lines[0].starts_with("at\tkind\tagent\tpeer\tdetail"));
    assert!(
        lines[1].contains("\ttls_untrusted_certificate\t-\t127.0.0.1:4002\t")
            && lines[1].ends_with("claimed subject \"evil\\n\\u{1b}[2J\""),
        "newest first, control characters escaped: {table}"
    );
    assert!(
        lines[2].contains(&format!("\tclient_id_mismatch\t{agent}\t127.0.0.1:4001\t")),
        "{table}"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&epmc(&data, &["security-events", "--json"]).stdout).expect("JSON");
    let events = json.as_array().expect("an array");
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["kind"], "connection_limit");
    assert_eq!(events[2]["agent"], serde_json::Value::Null);
    assert_eq!(events[1]["agent"], agent.to_string());
    assert_eq!(events[0]["detail"], "claimed subject \"evil\n\u{1b}[2J\"");
}
