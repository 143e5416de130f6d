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

fn validator(file: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(dir().join(file)).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&schema).unwrap()
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
        // A schema violation is caught by both the schema and the decoder.
        let mut bad = value.clone();
        bad["sent_at"] = serde_json::json!("yesterday");
        assert!(
            !envelope.is_valid(&bad)
                || !body.is_valid(&bad["body"])
                || Envelope::from_json(&serde_json::to_vec(&bad).unwrap()).is_err()
        );
        assert!(Envelope::from_json(&serde_json::to_vec(&bad).unwrap()).is_err());
    }
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
            let action = match src % 5 {
                0 => OrderAction::SourceChange {
                    source: HexCode::new(src),
                },
                1 => OrderAction::AvMute { on: mute },
                2 => OrderAction::ChangeSetting {
                    name: SettingName::Volume,
                    value: BoundedString::new(vol.to_string()).unwrap(),
                },
                3 => OrderAction::PowerOn,
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
