//! The configuration file: a good file parses into exactly what it says; every kind of bad
//! line is refused with its line number and reason.

use std::net::SocketAddr;
use std::time::Duration;

use epmc_agent::config::{AgentConfig, Mode, SessionMode, TargetSpec};

const GOOD: &str = r#"# EPMC agent
mode = "monitor-only"
concurrency = 8

[schedule]
status_interval_seconds = 30
full_collection_interval_seconds = 3600

[server]
url = "mqtts://epmc.example.com:443"
ca_cert = "/etc/epmc-agent/server-ca.pem"
client_cert = "/etc/epmc-agent/agent.pem"
client_key = "/etc/epmc-agent/agent.key"

[proxy]
url = "http://proxy.example.com:3128"

[[target]]
address = "192.168.10.21"
password = "monitor-pw"
display_name = "Room 101"
group = "Building A"
comment = "ceiling mount"
session = "hold"

[[target]]
address = "192.168.20.0/29:4000"

[[target]]
address = "[fd00::7]:3630"
session = "poll"
"#;

const MINIMAL: &str = r#"
[server]
url = "mqtts://epmc.example.com"
ca_cert = "ca.pem"
client_cert = "agent.pem"
client_key = "agent.key"
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn good_file_parses_into_what_it_says() {
    let c = AgentConfig::parse(GOOD).expect("valid");
    assert_eq!(c.mode, Mode::MonitorOnly);
    assert_eq!(c.concurrency, 8);
    assert_eq!(c.schedule.status_interval, Duration::from_secs(30));
    assert_eq!(
        c.schedule.full_collection_interval,
        Duration::from_secs(3600)
    );
    assert_eq!(c.server.url.host, "epmc.example.com");
    assert_eq!(c.server.url.port, 443);
    assert_eq!(
        c.server.ca_cert.to_str(),
        Some("/etc/epmc-agent/server-ca.pem")
    );
    assert_eq!(
        c.server.client_cert.to_str(),
        Some("/etc/epmc-agent/agent.pem")
    );
    assert_eq!(
        c.server.client_key.to_str(),
        Some("/etc/epmc-agent/agent.key")
    );
    let proxy = c.proxy.as_ref().expect("proxy");
    assert_eq!(
        (proxy.host.as_str(), proxy.port),
        ("proxy.example.com", 3128)
    );

    assert_eq!(c.targets.len(), 3);
    let t = &c.targets[0];
    assert_eq!(t.spec, TargetSpec::Single(addr("192.168.10.21:3629")));
    assert_eq!(t.password.as_ref().map(|p| p.as_str()), Some("monitor-pw"));
    assert_eq!(t.meta.display_name.as_deref(), Some("Room 101"));
    assert_eq!(t.meta.group.as_deref(), Some("Building A"));
    assert_eq!(t.meta.comment.as_deref(), Some("ceiling mount"));
    assert_eq!(t.session, SessionMode::Hold);
    assert_eq!(t.line, 19);
    let r = &c.targets[1];
    assert_eq!(r.session, SessionMode::Poll);
    assert_eq!(r.password, None);
    assert_eq!(r.line, 27);
    assert_eq!(c.targets[2].line, 30);

    // The exact list of addresses that may be contacted, in order, and nothing else.
    let endpoints: Vec<String> = c.endpoints().iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(
        endpoints,
        [
            "192.168.10.21:3629",
            "192.168.20.1:4000",
            "192.168.20.2:4000",
            "192.168.20.3:4000",
            "192.168.20.4:4000",
            "192.168.20.5:4000",
            "192.168.20.6:4000",
            "[fd00::7]:3630",
        ]
    );
    let e = &c.endpoints()[0];
    assert_eq!(e.password.as_ref().map(|p| p.as_str()), Some("monitor-pw"));
    assert_eq!(e.session, SessionMode::Hold);
    assert_eq!(e.meta.display_name.as_deref(), Some("Room 101"));
    assert_eq!(c.endpoints()[3].password, None);
}

#[test]
fn defaults_apply_to_a_minimal_file() {
    let c = AgentConfig::parse(MINIMAL).expect("valid");
    assert_eq!(c.mode, Mode::Bidirectional);
    assert_eq!(c.concurrency, 16);
    assert_eq!(c.schedule.status_interval, Duration::from_secs(60));
    assert_eq!(
        c.schedule.full_collection_interval,
        Duration::from_secs(86_400)
    );
    assert_eq!(c.server.url.port, 8883);
    assert_eq!(c.proxy, None);
    assert!(c.targets.is_empty());
    assert!(c.endpoints().is_empty());
}

/// Replaces the first occurrence of `from` in the good file and expects an error on `line`
/// whose message contains every one of `words`.
fn refused(from: &str, to: &str, line: usize, words: &[&str]) {
    assert!(GOOD.contains(from), "{from:?} is not in the good file");
    let text = GOOD.replacen(from, to, 1);
    let err = AgentConfig::parse(&text).expect_err(&format!("{to:?} must be refused"));
    assert_eq!(err.line, Some(line), "{to:?}: {err}");
    for w in words {
        assert!(
            err.message.contains(w),
            "{to:?}: {:?} lacks {w:?}",
            err.message
        );
    }
    assert!(
        err.to_string().starts_with(&format!("line {line}: ")),
        "{err}"
    );
}

#[test]
fn unknown_keys_are_refused_by_name() {
    refused("concurrency = 8", "concurency = 8", 3, &["concurency"]);
    refused(
        "status_interval_seconds = 30",
        "status_interval = 30",
        6,
        &["status_interval"],
    );
    refused("client_key = ", "client_kee = ", 13, &["client_kee"]);
    refused(
        "group = \"Building A\"",
        "grup = \"Building A\"",
        22,
        &["grup"],
    );
    refused("[proxy]\nurl", "[proxy]\nuri", 16, &["uri"]);
    refused("[schedule]", "[schedul]", 5, &["schedul"]);
}

#[test]
fn bad_values_are_refused_with_their_line() {
    refused(
        "mode = \"monitor-only\"",
        "mode = \"monitor\"",
        2,
        &["monitor"],
    );
    refused(
        "concurrency = 8",
        "concurrency = 0",
        3,
        &["concurrency", "1..=256"],
    );
    refused("concurrency = 8", "concurrency = 1000", 3, &["concurrency"]);
    refused(
        "concurrency = 8",
        "concurrency = \"eight\"",
        3,
        &["invalid type"],
    );
    refused(
        "status_interval_seconds = 30",
        "status_interval_seconds = 1",
        6,
        &["status_interval_seconds", "10..=3600"],
    );
    refused(
        "full_collection_interval_seconds = 3600",
        "full_collection_interval_seconds = 60",
        7,
        &["full_collection_interval_seconds"],
    );
    refused(
        "status_interval_seconds = 30\nfull_collection_interval_seconds = 3600",
        "status_interval_seconds = 1800\nfull_collection_interval_seconds = 900",
        7,
        &["full_collection_interval_seconds (900) is shorter than status_interval_seconds (1800)"],
    );
    refused(
        "mqtts://epmc.example.com:443",
        "mqtt://epmc.example.com:443",
        10,
        &["mqtts://"],
    );
    refused(
        "mqtts://epmc.example.com:443",
        "mqtts://epmc.example.com:99999",
        10,
        &["port"],
    );
    refused(
        "ca_cert = \"/etc/epmc-agent/server-ca.pem\"",
        "ca_cert = \"\"",
        11,
        &["ca_cert", "empty"],
    );
    refused(
        "http://proxy.example.com:3128",
        "http://proxy.example.com",
        16,
        &["port"],
    );
    refused("session = \"hold\"", "session = \"keep\"", 24, &["keep"]);
}

#[test]
fn bad_targets_are_refused_with_their_line() {
    refused(
        "\"192.168.10.21\"",
        "\"projector.local\"",
        19,
        &["not an IP address"],
    );
    refused("\"192.168.10.21\"", "\"192.168.10.21:0\"", 19, &["port"]);
    refused(
        "\"192.168.10.21\"",
        "\"192.168.10.256\"",
        19,
        &["not an IP address"],
    );
    refused(
        "\"192.168.20.0/29:4000\"",
        "\"10.0.0.0/8\"",
        27,
        &["16777216 addresses", "at most 65536"],
    );
    refused(
        "\"192.168.20.0/29:4000\"",
        "\"192.168.20.9/29\"",
        27,
        &["host bits", "192.168.20.8/29"],
    );
    refused(
        "\"192.168.20.0/29:4000\"",
        "\"192.168.20.0/40\"",
        27,
        &["prefix"],
    );
    refused(
        "\"[fd00::7]:3630\"",
        "\"fd00::/64\"",
        30,
        &["at most 65536"],
    );
    refused(
        "\"192.168.10.21\"",
        "\"224.0.0.1\"",
        19,
        &["cannot be a projector"],
    );
    refused(
        "password = \"monitor-pw\"",
        "password = \"a-password-longer-than-16\"",
        20,
        &["password", "16"],
    );
    let long = format!("display_name = \"{}\"", "x".repeat(65));
    refused(
        "display_name = \"Room 101\"",
        &long,
        21,
        &["display_name", "64"],
    );
    refused(
        "comment = \"ceiling mount\"",
        "comment = \"bell\\u0007\"",
        23,
        &["comment", "control character"],
    );
    // The same address twice: the second target is refused, naming the first.
    refused(
        "\"[fd00::7]:3630\"",
        "\"192.168.20.4:4000\"",
        30,
        &["192.168.20.4:4000", "line 27"],
    );
    // A missing key: the line of its table.
    refused(
        "address = \"192.168.10.21\"\n",
        "",
        18,
        &["missing field `address`"],
    );
}

#[test]
fn structural_errors_are_refused_with_their_line() {
    // TOML syntax.
    refused("concurrency = 8", "concurrency = ", 3, &[]);
    // A missing section.
    let text = GOOD.replacen("[server]", "[not_server]", 1);
    let err = AgentConfig::parse(&text).expect_err("refused");
    assert_eq!(err.line, Some(9), "{err}");
    // No [server] at all.
    let err = AgentConfig::parse("concurrency = 4\n").expect_err("refused");
    assert!(err.message.contains("missing field `server`"), "{err}");
    // Missing server key.
    let err = AgentConfig::parse(&MINIMAL.replacen("client_key = \"agent.key\"\n", "", 1))
        .expect_err("refused");
    assert!(err.message.contains("client_key"), "{err}");
    assert_eq!(err.line, Some(2), "{err}");
}

#[test]
fn total_expansion_is_bounded() {
    let mut text = MINIMAL.to_owned();
    for net in 0..3 {
        text.push_str(&format!("\n[[target]]\naddress = \"10.{net}.0.0/16\"\n"));
    }
    let err = AgentConfig::parse(&text).expect_err("refused");
    assert!(err.message.contains("65536 addresses in all"), "{err}");
    assert_eq!(err.line, Some(12), "{err}");
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("epmc-agent-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        GOOD.replacen("concurrency = 8", "concurrency = 0", 1),
    )
    .expect("write");
    let err = AgentConfig::load(&path).expect_err("refused");
    assert_eq!(err.file.as_deref(), Some(path.as_path()));
    assert!(
        err.to_string()
            .starts_with(&format!("{}:3: ", path.display())),
        "{err}"
    );
    let missing = AgentConfig::load(&dir.join("absent.toml")).expect_err("refused");
    assert!(missing.to_string().contains("cannot read"), "{missing}");
    std::fs::write(&path, GOOD).expect("write");
    assert_eq!(AgentConfig::load(&path).expect("valid").targets.len(), 3);

    // Relative certificate paths are taken relative to the file; notes name what is missing
    // and a world-readable file that holds passwords.
    std::fs::write(
        &path,
        GOOD.replacen("/etc/epmc-agent/server-ca.pem", "ca.pem", 1),
    )
    .expect("write");
    std::fs::write(dir.join("ca.pem"), "not checked here").expect("write");
    let c = AgentConfig::load(&path).expect("valid");
    assert_eq!(c.server.ca_cert, dir.join("ca.pem"));
    assert_eq!(
        c.server.client_cert,
        std::path::PathBuf::from("/etc/epmc-agent/agent.pem")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let notes = c.notes(Some(&path));
        assert!(!notes.iter().any(|n| n.starts_with("ca_cert")), "{notes:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("client_cert /etc/epmc-agent/agent.pem does not exist")),
            "{notes:?}"
        );
        assert!(
            notes.iter().any(|n| n.contains("readable by every user")),
            "{notes:?}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let notes = c.notes(Some(&path));
        assert!(
            !notes.iter().any(|n| n.contains("readable by every user")),
            "{notes:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn proxy_credentials_are_read_and_checked_with_their_line() {
    let with = |extra: &str| {
        GOOD.replacen(
            "url = \"http://proxy.example.com:3128\"\n",
            &format!("url = \"http://proxy.example.com:3128\"\n{extra}"),
            1,
        )
    };
    let c =
        AgentConfig::parse(&with("username = \"agent\"\npassword = \"p:w d\"\n")).expect("valid");
    let p = c.proxy.expect("proxy");
    let creds = p.credentials.as_ref().expect("credentials");
    assert_eq!((creds.username(), creds.password()), ("agent", "p:w d"));
    let http = p.to_http_proxy();
    assert_eq!((http.host.as_str(), http.port), ("proxy.example.com", 3128));
    assert_eq!(http.credentials.as_ref(), Some(creds));
    assert!(
        !format!("{p:?}").contains("p:w d"),
        "Debug hides the password"
    );
    // Without credentials.
    let p = AgentConfig::parse(GOOD).unwrap().proxy.unwrap();
    assert_eq!(p.credentials, None);
    assert_eq!(p.to_http_proxy().credentials, None);

    let refused = |extra: &str, line: usize, words: &[&str]| {
        let err = AgentConfig::parse(&with(extra)).expect_err(extra);
        assert_eq!(err.line, Some(line), "{extra:?}: {err}");
        for w in words {
            assert!(err.message.contains(w), "{extra:?}: {err}");
        }
    };
    refused(
        "username = \"agent\"\n",
        17,
        &["username without a password"],
    );
    refused("password = \"pw\"\n", 17, &["password without a username"]);
    refused(
        "username = \"a:b\"\npassword = \"pw\"\n",
        17,
        &["may not contain ':'"],
    );
    refused(
        "username = \"agent\"\npassword = \"p\\u0000w\"\n",
        18,
        &["password", "control character"],
    );
    refused(
        "username = \"\"\npassword = \"pw\"\n",
        17,
        &["user name is empty"],
    );
    refused("user = \"agent\"\n", 17, &["user"]);
}

#[test]
fn the_shipped_example_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.toml");
    let c = AgentConfig::load(&path).expect("agent.example.toml is valid");
    assert_eq!(c.targets.len(), 2);
    assert_eq!(c.endpoints().len(), 1 + 254);
}
