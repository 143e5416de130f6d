//! The configuration's optional `[update]` section: what a good one parses into, and each
//! bad one refused with its line and reason.

use std::time::Duration;

use epmc_agent::config::{AgentConfig, DEFAULT_UPDATE_INTERVAL, HttpsUrl};

const SERVER: &str = r#"
[server]
url = "mqtts://epmc.example.com"
ca_cert = "ca.crt"
client_cert = "agent.crt"
client_key = "agent.key"
"#;

const KEY: &str = "ed25519:3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";

fn with_update(section: &str) -> String {
    format!("{SERVER}\n[update]\n{section}")
}

#[test]
fn no_section_means_no_self_update() {
    assert_eq!(AgentConfig::parse(SERVER).unwrap().update, None);
}

#[test]
fn a_good_section_parses_into_what_it_says() {
    let c = AgentConfig::parse(&with_update(&format!(
        "url = \"https://epmc.example.com:8443\"\npublic_key = \"{KEY}\"\ncheck_interval_seconds = 7200\n"
    )))
    .unwrap();
    let u = c.update.unwrap();
    assert_eq!(
        u.url,
        HttpsUrl {
            host: "epmc.example.com".into(),
            port: 8443
        }
    );
    assert_eq!(u.url.to_string(), "https://epmc.example.com:8443");
    assert_eq!(u.public_key.to_string(), KEY);
    assert_eq!(u.check_interval, Duration::from_secs(7200));

    let c = AgentConfig::parse(&with_update(&format!(
        "url = \"https://[::1]\"\npublic_key = \"{KEY}\"\n"
    )))
    .unwrap();
    let u = c.update.unwrap();
    assert_eq!(u.url.port, 443);
    assert_eq!(u.url.to_string(), "https://[::1]:443");
    assert_eq!(u.check_interval, DEFAULT_UPDATE_INTERVAL);
}

#[test]
fn bad_sections_are_refused_with_line_and_reason() {
    // The [update] table starts on line 8 of these documents; its first key is on line 9.
    let cases = [
        (
            "url = \"https://x:8443\"\npublic_key = \"ed25519:abcd\"\n".to_owned(),
            10,
            "public key",
        ),
        (
            format!("url = \"https://x:8443\"\npublic_key = \"{}\"\n", &KEY[8..]),
            10,
            "expected ed25519:",
        ),
        (
            format!("url = \"http://x:8443\"\npublic_key = \"{KEY}\"\n"),
            9,
            "must start with https://",
        ),
        (
            format!("url = \"https://x/path\"\npublic_key = \"{KEY}\"\n"),
            9,
            "no path",
        ),
        (
            format!("url = \"https://x\"\npublic_key = \"{KEY}\"\ncheck_interval_seconds = 60\n"),
            11,
            "check_interval_seconds = 60 is out of range",
        ),
        (
            format!("url = \"https://x\"\npublic_key = \"{KEY}\"\nsignature = \"x\"\n"),
            11,
            "signature",
        ),
        ("url = \"https://x\"\n".to_owned(), 8, "public_key"),
    ];
    for (section, line, reason) in cases {
        let text = with_update(&section);
        let e = AgentConfig::parse(&text).unwrap_err();
        assert_eq!(e.line, Some(line), "{text}\n{e}");
        assert!(e.message.contains(reason), "{text}\n{e}");
    }
}
