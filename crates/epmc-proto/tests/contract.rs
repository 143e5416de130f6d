//! The contract: schemas in sync with the code, one validated example per kind,
//! compatibility rules, the size budget, and round-trip properties.
//!
//! Regenerate the committed schemas and examples with
//! `EPMC_BLESS=1 cargo test -p epmc-proto --test contract`.

use std::path::PathBuf;

use epmc_proto::bounded::{BoundedString, BoundedVec, HexCode, Real, Timestamp};
use epmc_proto::model::*;
use epmc_proto::order::*;
use epmc_proto::sample::{collection, sample};
use epmc_proto::{Envelope, Kind, MAX_PAYLOAD_BYTES, Message, ProtoError, schemas};
use proptest::prelude::*;
use uuid::Uuid;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema")
}

fn bless() -> bool {
    std::env::var_os("EPMC_BLESS").is_some()
}

/// A validator for a committed schema file, with `format` validated (by default `format` is
/// only an annotation, and `"sent_at": "yesterday"` would pass as a `date-time`).
fn validator(file: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(dir().join(file)).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap()
}

#[test]
fn committed_schemas_match_the_code() {
    std::fs::create_dir_all(dir()).unwrap();
    for (file, schema) in schemas() {
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        let path = dir().join(&file);
        if bless() {
            std::fs::write(&path, &text).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            committed, text,
            "{file} drifted from the code: run EPMC_BLESS=1 cargo test -p epmc-proto --test contract"
        );
    }
}

#[test]
fn every_example_validates_and_decodes() {
    let examples = dir().join("examples");
    std::fs::create_dir_all(&examples).unwrap();
    let envelope = validator("envelope.schema.json");
    for kind in Kind::ALL {
        let path = examples.join(format!("{}.json", kind.as_str()));
        if bless() {
            let value: serde_json::Value =
                serde_json::from_slice(&sample(kind).to_json().unwrap()).unwrap();
            std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap() + "\n").unwrap();
        }
        let text = std::fs::read(&path).unwrap_or_else(|_| panic!("missing {path:?}"));
        let value: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let errors: Vec<String> = envelope
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{kind:?} envelope: {errors:?}");
        let body = validator(&format!("{}.schema.json", kind.as_str()));
        let errors: Vec<String> = body
            .iter_errors(&value["body"])
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{kind:?} body: {errors:?}");
        let decoded = Envelope::from_json(&text).unwrap();
        assert_eq!(decoded.kind(), kind);
        assert_eq!(
            decoded,
            sample(kind),
            "{kind:?} example differs from the code's sample"
        );
    }
}

/// The committed example of a kind, as JSON.
fn example(kind: Kind) -> serde_json::Value {
    serde_json::from_slice(&sample(kind).to_json().unwrap()).unwrap()
}

/// One document, judged separately by the published schemas (with format validation) and by
/// the decoder. `Ok` when both agree with `expect_valid`; otherwise says which side disagreed.
fn judge(name: &str, doc: &serde_json::Value, expect_valid: bool) -> Result<(), String> {
    static VALIDATORS: std::sync::OnceLock<
        std::collections::HashMap<String, jsonschema::Validator>,
    > = std::sync::OnceLock::new();
    let validators = VALIDATORS.get_or_init(|| {
        schemas()
            .into_iter()
            .map(|(file, _)| (file.clone(), validator(&file)))
            .collect()
    });
    let mut failures = Vec::new();
    let envelope_errors: Vec<String> = validators["envelope.schema.json"]
        .iter_errors(doc)
        .map(|e| e.to_string())
        .collect();
    if envelope_errors.is_empty() != expect_valid {
        failures.push(format!(
            "envelope schema {} it {envelope_errors:?}",
            if expect_valid { "rejects" } else { "accepts" }
        ));
    }
    // The body schema of the document's kind, for documents whose body is what is wrong (a bad
    // envelope around a good body is no business of the body schema) or that must be valid.
    if let Some(kind) = doc["kind"].as_str().and_then(Kind::parse)
        && (expect_valid || name.starts_with("body:"))
    {
        let body = &validators[&format!("{}.schema.json", kind.as_str())];
        if body.is_valid(&doc["body"]) != expect_valid {
            failures.push(format!(
                "{} body schema {} it",
                kind.as_str(),
                if expect_valid { "rejects" } else { "accepts" }
            ));
        }
    }
    let decoded = Envelope::from_json(&serde_json::to_vec(doc).unwrap());
    if decoded.is_ok() != expect_valid {
        failures.push(format!(
            "decoder {} it ({:?})",
            if expect_valid { "rejects" } else { "accepts" },
            decoded.err()
        ));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{name}: {}", failures.join("; ")))
    }
}

type Edit = fn(&mut serde_json::Value);

/// Documents that break one rule each: the published schema (formats validated) must reject
/// every one AND the decoder must reject every one. Names starting with `body:` break the
/// body, so the kind's own body schema must reject them too.
fn bad_documents() -> Vec<(&'static str, Kind, Edit)> {
    use serde_json::json;
    let mut cases: Vec<(&'static str, Kind, Edit)> = Vec::new();
    // Every kind: the envelope's own rules.
    for kind in Kind::ALL {
        cases.extend([
            (
                "sent_at is not a date-time",
                kind,
                (|v| v["sent_at"] = json!("yesterday")) as Edit,
            ),
            ("sent_at without an offset", kind, |v| {
                v["sent_at"] = json!("2026-11-24T12:00:00")
            }),
            ("sent_at in month 13", kind, |v| {
                v["sent_at"] = json!("2026-13-24T12:00:00Z")
            }),
            ("id is not a uuid", kind, |v| v["id"] = json!("not-a-uuid")),
            ("newer schema version", kind, |v| v["schema"] = json!(2)),
            ("schema version 0", kind, |v| v["schema"] = json!(0)),
            ("schema version as a string", kind, |v| {
                v["schema"] = json!("1")
            }),
            ("unknown kind", kind, |v| v["kind"] = json!("teleport")),
            ("missing sent_at", kind, |v| {
                drop(v.as_object_mut().unwrap().remove("sent_at"))
            }),
            ("missing id", kind, |v| {
                drop(v.as_object_mut().unwrap().remove("id"))
            }),
            ("missing kind", kind, |v| {
                drop(v.as_object_mut().unwrap().remove("kind"))
            }),
            ("missing body", kind, |v| {
                drop(v.as_object_mut().unwrap().remove("body"))
            }),
        ]);
    }
    cases.extend([
        // Formats and patterns inside bodies.
        ("body: observed_at is a date only", Kind::Snapshot, (|v| v["body"]["observed_at"] = json!("2026-11-24")) as Edit),
        ("body: expires_at is not a date-time", Kind::Order, |v| v["body"]["expires_at"] = json!("soon")),
        ("body: order_id is not a uuid", Kind::Order, |v| v["body"]["order_id"] = json!("1234")),
        ("body: agent_id is not a uuid", Kind::Hello, |v| v["body"]["agent_id"] = json!("agent-1")),
        ("body: ip_address is not an IP address", Kind::Collection, |v| v["body"]["settings"]["ip_address"] = json!("300.1.2.3")),
        ("body: ip_address is a host name", Kind::Collection, |v| v["body"]["settings"]["ip_address"] = json!("projector.local")),
        ("body: power_code of one digit", Kind::Snapshot, |v| v["body"]["status"]["power_code"] = json!("1")),
        ("body: power_code not hex", Kind::Snapshot, |v| v["body"]["status"]["power_code"] = json!("GG")),
        ("body: control character in a message", Kind::ExceptionLog, |v| v["body"]["entries"][0]["message"] = json!("bell\u{7}")),
        ("body: escape character in a device id", Kind::Snapshot, |v| v["body"]["device_id"] = json!("X\u{1b}[2J")),
        // Bounds.
        ("body: device_id of 65 characters", Kind::Snapshot, |v| v["body"]["device_id"] = json!("x".repeat(65))),
        ("body: reason of 1001 characters", Kind::Event, |v| v["body"]["event"] = json!({"type": "unreachable", "reason": "r".repeat(1001)})),
        ("body: nine lamps", Kind::Snapshot, |v| v["body"]["status"]["light_up_time_hours"] = json!([1, 2, 3, 4, 5, 6, 7, 8, 9])),
        ("body: 201 log entries", Kind::ExceptionLog, |v| {
            let one = v["body"]["entries"][0].clone();
            v["body"]["entries"] = serde_json::Value::Array(vec![one; 201]);
        }),
        ("body: device count over u32", Kind::Hello, |v| v["body"]["connected_device_count"] = json!(4_294_967_296u64)),
        ("body: negative device count", Kind::Hello, |v| v["body"]["connected_device_count"] = json!(-1)),
        ("body: operation hours over u32", Kind::Snapshot, |v| v["body"]["status"]["total_operation_time_hours"] = json!(4_294_967_296u64)),
        ("body: volume over 255", Kind::Collection, |v| v["body"]["settings"]["volume"] = json!(256)),
        ("body: number too large for f32", Kind::Collection, |v| v["body"]["info"]["temperature_limit_celsius"] = json!(1e39)),
        ("body: fractional count", Kind::Hello, |v| v["body"]["connected_device_count"] = json!(2.5)),
        // Required fields.
        ("body: snapshot without device_id", Kind::Snapshot, |v| drop(v["body"].as_object_mut().unwrap().remove("device_id"))),
        ("body: snapshot without status", Kind::Snapshot, |v| drop(v["body"].as_object_mut().unwrap().remove("status"))),
        ("body: order without issued_by", Kind::Order, |v| drop(v["body"].as_object_mut().unwrap().remove("issued_by"))),
        ("body: source_change without source", Kind::Order, |v| drop(v["body"].as_object_mut().unwrap().remove("source"))),
        ("body: order_result without at", Kind::OrderResult, |v| drop(v["body"].as_object_mut().unwrap().remove("at"))),
        ("body: failed without reason", Kind::OrderResult, |v| drop(v["body"].as_object_mut().unwrap().remove("reason"))),
        ("body: hello without agent_id", Kind::Hello, |v| drop(v["body"].as_object_mut().unwrap().remove("agent_id"))),
        ("body: log entry without severity", Kind::ExceptionLog, |v| drop(v["body"]["entries"][0].as_object_mut().unwrap().remove("severity"))),
        // Enumerations.
        ("body: unknown power state", Kind::Snapshot, |v| v["body"]["status"]["power"] = json!("exploded")),
        ("body: unknown severity", Kind::ExceptionLog, |v| v["body"]["entries"][0]["severity"] = json!("fatal")),
        ("body: unknown order action", Kind::Order, |v| v["body"]["action"] = json!("self_destruct")),
        ("body: unknown outcome", Kind::OrderResult, |v| v["body"]["outcome"] = json!("maybe")),
        ("body: unknown failure reason", Kind::OrderResult, |v| v["body"]["reason"] = json!("bad_luck")),
        ("body: unknown event type", Kind::Event, |v| v["body"]["event"]["type"] = json!("exploded")),
        ("body: unknown warning", Kind::Event, |v| v["body"]["event"]["warnings"] = json!(["smoke"])),
        // Settings: the allow-list and each setting's value rule.
        ("body: setting not on the allow-list", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "factory_reset", "value": "1", "issued_by": "user:1"})),
        ("body: volume 300", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "volume", "value": "300", "issued_by": "user:1"})),
        ("body: volume not a number", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "volume", "value": "loud", "issued_by": "user:1"})),
        ("body: colour mode not hex", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "color_mode", "value": "ZZ", "issued_by": "user:1"})),
        ("body: empty projector name", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "projector_name", "value": "", "issued_by": "user:1"})),
        ("body: projector name with a colon", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "projector_name", "value": "a:b", "issued_by": "user:1"})),
        ("body: projector name with a space", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "projector_name", "value": "Hall 1", "issued_by": "user:1"})),
        ("body: luminance level -1", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "luminance_constant_level", "value": "-1", "issued_by": "user:1"})),
    ]);
    cases
}

/// Documents that both sides must accept: the samples, and values at the edge of each rule.
fn good_documents() -> Vec<(&'static str, Kind, Edit)> {
    use serde_json::json;
    let mut cases: Vec<(&'static str, Kind, Edit)> = Vec::new();
    for kind in Kind::ALL {
        cases.extend([
            ("the sample", kind, (|_| {}) as Edit),
            ("sent_at with an offset and fraction", kind, |v| {
                v["sent_at"] = json!("2026-11-24T12:00:00.123+02:00")
            }),
            ("an unknown top-level field", kind, |v| {
                v["future"] = json!({"x": 1})
            }),
            ("schema version written 1.0", kind, |v| {
                v["schema"] = json!(1.0)
            }),
        ]);
    }
    cases.extend([
        ("body: device_id of 64 characters", Kind::Snapshot, (|v| v["body"]["device_id"] = json!("x".repeat(64))) as Edit),
        ("body: eight lamps", Kind::Snapshot, |v| v["body"]["status"]["light_up_time_hours"] = json!([1, 2, 3, 4, 5, 6, 7, 8])),
        ("body: lower-case hex code", Kind::Snapshot, |v| v["body"]["status"]["power_code"] = json!("0a")),
        ("body: largest u32", Kind::Hello, |v| v["body"]["connected_device_count"] = json!(4_294_967_295u64)),
        ("body: tab and newline in a message", Kind::ExceptionLog, |v| v["body"]["entries"][0]["message"] = json!("line 1\n\tline 2 ü")),
        ("body: IPv6 address", Kind::Collection, |v| v["body"]["settings"]["ip_address"] = json!("2001:db8::41")),
        ("body: null optional field", Kind::Hello, |v| v["body"]["locale"] = serde_json::Value::Null),
        ("body: unknown status field", Kind::Snapshot, |v| v["body"]["status"]["future_reading"] = json!(3)),
        ("body: volume 255", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "volume", "value": "255", "issued_by": "user:1"})),
        ("body: luminance level 007", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "luminance_constant_level", "value": "007", "issued_by": "user:1"})),
        ("body: colour mode 0a", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "color_mode", "value": "0a", "issued_by": "user:1"})),
        ("body: projector name of 16 characters", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting", "name": "projector_name", "value": "Hall-1_(north)~!", "issued_by": "user:1"})),
        ("body: a count written 2.0", Kind::Hello, |v| v["body"]["connected_device_count"] = json!(2.0)),
        ("body: hours written 1.8e3", Kind::Snapshot, |v| v["body"]["status"]["total_operation_time_hours"] = json!(1.8e3)),
        ("body: an integer for a real", Kind::Snapshot, |v| v["body"]["status"]["luminance_sensor"] = json!(812)),
        ("body: power on for the whole agent", Kind::Order, |v| v["body"] = json!({"order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "power_on", "issued_by": "user:1"})),
    ]);
    cases
}

#[test]
fn bad_documents_are_rejected_by_the_schema_and_by_the_decoder() {
    let mut failures = Vec::new();
    for (name, kind, edit) in bad_documents() {
        let mut doc = example(kind);
        edit(&mut doc);
        if let Err(e) = judge(name, &doc, false) {
            failures.push(format!("{}: {e}", kind.as_str()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn good_documents_are_accepted_by_the_schema_and_by_the_decoder() {
    let mut failures = Vec::new();
    for (name, kind, edit) in good_documents() {
        let mut doc = example(kind);
        edit(&mut doc);
        if let Err(e) = judge(name, &doc, true) {
            failures.push(format!("{}: {e}", kind.as_str()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn unknown_fields_are_ignored_unknown_kinds_and_newer_schemas_are_typed_errors() {
    let mut v: serde_json::Value =
        serde_json::from_slice(&sample(Kind::Snapshot).to_json().unwrap()).unwrap();
    v["future_field"] = serde_json::json!({"x": 1});
    v["body"]["status"]["future_reading"] = serde_json::json!(3);
    let decoded = Envelope::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(decoded, sample(Kind::Snapshot));

    let mut unknown = v.clone();
    unknown["kind"] = serde_json::json!("teleport");
    assert!(matches!(
        Envelope::from_json(&serde_json::to_vec(&unknown).unwrap()),
        Err(ProtoError::UnknownKind(k)) if k == "teleport"
    ));

    let mut newer = v.clone();
    newer["schema"] = serde_json::json!(2);
    assert!(matches!(
        Envelope::from_json(&serde_json::to_vec(&newer).unwrap()),
        Err(ProtoError::UnsupportedSchema { found: 2 })
    ));
}

#[test]
fn limits_are_enforced_on_decode() {
    let mut v: serde_json::Value =
        serde_json::from_slice(&sample(Kind::Snapshot).to_json().unwrap()).unwrap();
    v["body"]["device_id"] = serde_json::json!("x".repeat(65));
    assert!(matches!(
        Envelope::from_json(&serde_json::to_vec(&v).unwrap()),
        Err(ProtoError::Invalid {
            kind: "snapshot",
            ..
        })
    ));
    let mut v: serde_json::Value =
        serde_json::from_slice(&sample(Kind::Snapshot).to_json().unwrap()).unwrap();
    v["body"]["status"]["light_up_time_hours"] = serde_json::json!([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert!(Envelope::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
    // A setting value outside its setting's rule.
    let mut v: serde_json::Value =
        serde_json::from_slice(&sample(Kind::Order).to_json().unwrap()).unwrap();
    v["body"] = serde_json::json!({
        "order_id": "0c6b9d10-4f0e-4a8e-9a4e-6b2d8f0f1a22", "action": "change_setting",
        "name": "volume", "value": "300", "issued_by": "user:1"
    });
    assert!(matches!(
        Envelope::from_json(&serde_json::to_vec(&v).unwrap()),
        Err(ProtoError::Rule { kind: "order", .. })
    ));
    // A setting that is not on the allow-list cannot even be named.
    v["body"]["name"] = serde_json::json!("factory_reset");
    v["body"]["value"] = serde_json::json!("1");
    assert!(matches!(
        Envelope::from_json(&serde_json::to_vec(&v).unwrap()),
        Err(ProtoError::Invalid { kind: "order", .. })
    ));
    // Oversized payloads are refused before parsing.
    let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
    assert!(matches!(
        Envelope::from_json(&big),
        Err(ProtoError::TooLarge { .. })
    ));
}

fn s<const N: usize>(text: &str) -> BoundedString<N> {
    BoundedString::new(text).unwrap()
}

fn ts(offset: i64) -> Timestamp {
    Timestamp::from_unix(1_795_000_000 + offset).unwrap()
}

#[test]
fn numbers_too_large_for_f32_are_refused_not_turned_into_null() {
    let mut v: serde_json::Value =
        serde_json::from_slice(&sample(Kind::Collection).to_json().unwrap()).unwrap();
    v["body"]["history"]["ac_voltage_volts"]["values"][3] = serde_json::json!(2.9e42);
    assert!(matches!(
        Envelope::from_json(&serde_json::to_vec(&v).unwrap()),
        Err(ProtoError::Invalid {
            kind: "collection",
            ..
        })
    ));
    assert!(Real::new(f32::INFINITY).is_err());
    assert!(Real::new(f32::NAN).is_err());
}

#[test]
fn absent_values_stay_absent() {
    let snap = Envelope::new(Message::Snapshot(DeviceSnapshot {
        device_id: s("X"),
        observed_at: ts(0),
        status: DeviceStatus::default(),
    }));
    let json = String::from_utf8(snap.to_json().unwrap()).unwrap();
    assert!(json.contains(r#""status":{}"#), "{json}");
    assert!(!json.contains("null"));
}

#[test]
fn thirty_days_of_hourly_history_fit_well_under_100_kb() {
    let envelope = Envelope::new(Message::Collection(Box::new(collection(30))));
    let bytes = envelope.to_json().unwrap();
    // Measured: about 14 KB (see BENCHMARKS.md); the white paper's budget is 100 KB.
    println!("full collection, 30 days hourly: {} bytes", bytes.len());
    assert!(bytes.len() < 40_000, "{} bytes", bytes.len());
    let back = Envelope::from_json(&bytes).unwrap();
    assert_eq!(back, envelope);
}

fn arb_text<const N: usize>() -> impl Strategy<Value = BoundedString<N>> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9 _./:-]{{0,{}}}", N.min(40)))
        .unwrap()
        .prop_map(|t| BoundedString::new(t).unwrap())
}

fn arb_status() -> impl Strategy<Value = DeviceStatus> {
    (
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(proptest::collection::vec(any::<u32>(), 1..4)),
        proptest::option::of(any::<u32>()),
        proptest::option::of(-40.0f32..120.0),
    )
        .prop_map(|(code, mute, lamps, ontime, lum)| DeviceStatus {
            power: code.map(PowerState::from_code),
            power_code: code.map(HexCode::new),
            av_mute: mute,
            light_up_time_hours: lamps.map(|l| BoundedVec::new(l).unwrap()),
            total_operation_time_hours: ontime,
            luminance_sensor: lum.map(|v| Real::new(v).unwrap()),
            ..DeviceStatus::default()
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            arb_text::<64>(),
            arb_status(),
            -1_000_000_000i64..4_000_000_000
        )
            .prop_map(|(id, status, t)| Message::Snapshot(DeviceSnapshot {
                device_id: id,
                observed_at: Timestamp::from_unix(t).unwrap(),
                status
            })),
        (
            arb_text::<64>(),
            any::<u128>(),
            any::<u32>(),
            proptest::option::of(arb_text::<64>())
        )
            .prop_map(|(code, id, n, locale)| Message::Hello(AgentHello {
                agent_code: code,
                version: BoundedString::new("1.2.3").unwrap(),
                agent_id: Uuid::from_u128(id),
                connected_device_count: n,
                locale,
                language: None,
                devices: BoundedVec::empty(),
            })),
        (any::<u128>(), any::<u8>(), any::<bool>(), 0u8..=255).prop_map(|(id, src, mute, vol)| {
            let action = match src % 6 {
                0 => OrderAction::SourceChange {
                    source: HexCode::new(src),
                },
                1 => OrderAction::AvMute { on: mute },
                2 => OrderAction::ChangeSetting {
                    name: SettingName::Volume,
                    value: BoundedString::new(vol.to_string()).unwrap(),
                },
                3 => OrderAction::PowerOn,
                4 => OrderAction::CopySettings {
                    source_device: BoundedString::new(format!("X{src:03}")).unwrap(),
                    profile: BoundedString::new("lecture").unwrap(),
                },
                _ => OrderAction::CheckAgentUpdate,
            };
            Message::Order(Order {
                order_id: Uuid::from_u128(id),
                device_id: None,
                action,
                issued_by: BoundedString::new("u").unwrap(),
                expires_at: None,
            })
        }),
        (
            any::<u128>(),
            0u8..4,
            proptest::option::of(arb_text::<200>())
        )
            .prop_map(|(id, r, reply)| {
                let outcome = match r {
                    0 => OrderOutcome::Accepted,
                    1 => OrderOutcome::Done,
                    2 => OrderOutcome::Failed {
                        reason: FailureReason::TimedOut,
                        detail: None,
                    },
                    _ => OrderOutcome::Failed {
                        reason: FailureReason::NotPermitted,
                        detail: Some(BoundedString::new("expired").unwrap()),
                    },
                };
                Message::OrderResult(OrderResult {
                    order_id: Uuid::from_u128(id),
                    at: Timestamp::from_unix(0).unwrap(),
                    outcome,
                    device_reply: reply,
                })
            }),
        (arb_text::<64>(), 0usize..3, arb_status()).prop_map(|(id, days, status)| {
            let mut c = collection(days);
            c.device_id = id;
            c.status = status;
            Message::Collection(Box::new(c))
        }),
        proptest::collection::vec(
            (
                0u8..3,
                arb_text::<64>(),
                arb_text::<1000>(),
                0i64..4_000_000_000
            ),
            0..5
        )
        .prop_map(|entries| Message::ExceptionLog(AgentExceptionLog {
            entries: BoundedVec::new(
                entries
                    .into_iter()
                    .map(|(sev, component, message, t)| ExceptionEntry {
                        at: Timestamp::from_unix(t).unwrap(),
                        severity: [Severity::Info, Severity::Warning, Severity::Error]
                            [sev as usize],
                        component,
                        message,
                    })
                    .collect()
            )
            .unwrap(),
        })),
        (
            arb_text::<64>(),
            prop_oneof![
                Just(DeviceEventKind::Reachable),
                arb_text::<1000>().prop_map(|reason| DeviceEventKind::Unreachable { reason }),
                Just(DeviceEventKind::Alarm { alarm: Alarm::Fan }),
            ]
        )
            .prop_map(|(id, event)| Message::Event(DeviceEvent {
                device_id: id,
                at: Timestamp::from_unix(0).unwrap(),
                event,
            })),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(message in arb_message(), id in any::<u128>(), t in 0i64..4_000_000_000) {
        let envelope = Envelope { schema: 1, id: Uuid::from_u128(id), sent_at: Timestamp::from_unix(t).unwrap(), message };
        let json = envelope.to_json().unwrap();
        prop_assert_eq!(Envelope::from_json(&json).unwrap(), envelope);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::from_json(&bytes);
    }

    #[test]
    fn arbitrary_json_bodies_never_panic(kind in prop::sample::select(Kind::ALL.to_vec()), body in arb_json(3)) {
        let v = serde_json::json!({"schema": 1, "id": "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f",
            "sent_at": "2026-11-24T12:00:00Z", "kind": kind.as_str(), "body": body});
        let _ = Envelope::from_json(&serde_json::to_vec(&v).unwrap());
    }
}

fn arb_json(depth: u32) -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z_]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(depth, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop::sample::select(vec![
                    "device_id",
                    "status",
                    "power",
                    "observed_at",
                    "order_id",
                    "action",
                    "name",
                    "value",
                    "entries",
                    "at",
                    "outcome",
                    "reason",
                    "values",
                    "start",
                ])
                .prop_map(str::to_owned),
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Each setting's value pattern in the schema accepts exactly what the decoder's rule accepts,
/// over every string of up to three characters from an alphabet that reaches each rule's edges
/// (digits, hex letters, signs, colon, space), and some longer ones.
#[test]
fn setting_value_patterns_agree_with_the_decoder() {
    let alphabet: Vec<char> = "0125679aAfFgG+-: ~".chars().collect();
    let mut values: Vec<String> = vec![
        String::new(),
        "255".into(),
        "256".into(),
        "0255".into(),
        "+255".into(),
        "00000000000000255".into(),
        "1000".into(),
        "Hall-1_(north)~!".into(),
        "Hall-1_(north)~!x".into(),
        "Ünicode".into(),
    ];
    for a in &alphabet {
        values.push(a.to_string());
        for b in &alphabet {
            values.push(format!("{a}{b}"));
            for c in &alphabet {
                values.push(format!("{a}{b}{c}"));
            }
        }
    }
    for name in SettingName::ALL {
        assert_eq!(serde_json::to_value(name).unwrap(), name.as_str());
        let pattern = jsonschema::validator_for(
            &serde_json::json!({ "type": "string", "pattern": name.value_pattern() }),
        )
        .unwrap();
        for value in &values {
            assert_eq!(
                pattern.is_valid(&serde_json::json!(value)),
                name.validate(value).is_ok(),
                "{name:?} {value:?}: the schema pattern and the decoder disagree"
            );
        }
    }
}

/// Where the decoder is looser than the schema (documented in the README): it also reads a
/// UUID without hyphens, which the schema's `uuid` format refuses. Producers send the
/// hyphenated form, and whatever decodes re-encodes hyphenated (and schema-valid).
#[test]
fn the_decoder_also_reads_uuids_without_hyphens() {
    let mut doc = example(Kind::Snapshot);
    doc["id"] = serde_json::json!("123456789abc4def8123456789abcdef");
    let verdict = judge("unhyphenated id", &doc, false).unwrap_err();
    assert!(
        verdict.contains("decoder accepts") && !verdict.contains("schema accepts"),
        "{verdict}"
    );
    let envelope = Envelope::from_json(&serde_json::to_vec(&doc).unwrap()).unwrap();
    let again: serde_json::Value = serde_json::from_slice(&envelope.to_json().unwrap()).unwrap();
    assert_eq!(again["id"], "12345678-9abc-4def-8123-456789abcdef");
    judge("re-encoded", &again, true).unwrap();
}

/// New messages get time-ordered ids (UUIDv7), each later one sorting after the earlier, so a
/// receiver's index of seen ids grows at its end; any UUID still decodes.
#[test]
fn new_ids_are_time_ordered_and_any_uuid_is_accepted() {
    let ids: Vec<Uuid> = (0..1000)
        .map(|_| Envelope::new(sample(Kind::Snapshot).message).id)
        .collect();
    assert!(ids.iter().all(|id| id.get_version_num() == 7), "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
    let mut old = sample(Kind::Snapshot);
    old.id = Uuid::from_u128(0x0123_4567_89ab_4def_8123_4567_89ab_cdef);
    let back = Envelope::from_json(&old.to_json().unwrap()).unwrap();
    assert_eq!(back.id, old.id);
}
