//! The JSON contract between the EPMC-rs agent and server.
//!
//! Every MQTT payload is an [`Envelope`]:
//!
//! ```json
//! { "schema": 1, "id": "…uuid…", "sent_at": "2026-11-24T12:00:00Z", "kind": "snapshot", "body": { … } }
//! ```
//!
//! - `id` makes delivery idempotent: the server stores each id once.
//! - `kind` names the body type ([`Kind`]); an unknown kind is a typed error
//!   ([`ProtoError::UnknownKind`]), never a crash.
//! - `schema` is the major version of this contract ([`SCHEMA_VERSION`]); a newer one is
//!   [`ProtoError::UnsupportedSchema`]. Unknown fields are ignored, so minor additions are
//!   compatible both ways.
//! - Every string and list has a documented maximum, enforced on decode, and a payload may not
//!   exceed [`MAX_PAYLOAD_BYTES`].
//!
//! JSON Schema files generated from these types live in `schema/` (see [`schemas`]); a test
//! fails when they drift from the code. Topic names are in [`topic`].
//!
//! ```
//! use epmc_proto::{Envelope, Message, Kind};
//! use epmc_proto::model::{DeviceSnapshot, DeviceStatus, PowerState};
//! use epmc_proto::bounded::Timestamp;
//!
//! let snapshot = DeviceSnapshot {
//!     device_id: "X8JK0000001".try_into()?,
//!     observed_at: Timestamp::from_unix(1_800_000_000)?,
//!     status: DeviceStatus { power: Some(PowerState::On), ..Default::default() },
//! };
//! let envelope = Envelope::new(Message::Snapshot(snapshot));
//! let json = envelope.to_json()?;
//! let back = Envelope::from_json(&json)?;
//! assert_eq!(back.kind(), Kind::Snapshot);
//! assert_eq!(back, envelope);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bounded;
pub mod hex;
pub mod model;
pub mod order;
pub mod release;
pub mod sample;
pub mod token;
pub mod topic;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bounded::Timestamp;
use crate::model::{AgentExceptionLog, AgentHello, DeviceEvent, DeviceSnapshot, FullCollection};
use crate::order::{Order, OrderResult};

/// The major version of this contract.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest payload accepted or produced, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 512 * 1024;

/// The message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// [`AgentHello`].
    Hello,
    /// [`DeviceSnapshot`].
    Snapshot,
    /// [`FullCollection`].
    Collection,
    /// [`DeviceEvent`].
    Event,
    /// [`AgentExceptionLog`].
    ExceptionLog,
    /// [`Order`].
    Order,
    /// [`OrderResult`].
    OrderResult,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 7] = [
        Kind::Hello,
        Kind::Snapshot,
        Kind::Collection,
        Kind::Event,
        Kind::ExceptionLog,
        Kind::Order,
        Kind::OrderResult,
    ];

    /// The `kind` string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Snapshot => "snapshot",
            Kind::Collection => "collection",
            Kind::Event => "event",
            Kind::ExceptionLog => "exception_log",
            Kind::Order => "order",
            Kind::OrderResult => "order_result",
        }
    }

    /// The kind a wire string names.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A message body, tagged by its kind.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Message {
    /// Agent information, on every connect.
    Hello(AgentHello),
    /// Status of one device.
    Snapshot(DeviceSnapshot),
    /// Full collection of one device (boxed: it is by far the largest).
    Collection(Box<FullCollection>),
    /// A device event.
    Event(DeviceEvent),
    /// Agent exception logs.
    ExceptionLog(AgentExceptionLog),
    /// An order (server → agent).
    Order(Order),
    /// An order result.
    OrderResult(OrderResult),
}

impl Message {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Snapshot(_) => Kind::Snapshot,
            Message::Collection(_) => Kind::Collection,
            Message::Event(_) => Kind::Event,
            Message::ExceptionLog(_) => Kind::ExceptionLog,
            Message::Order(_) => Kind::Order,
            Message::OrderResult(_) => Kind::OrderResult,
        }
    }
}

/// A message with its envelope.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
pub struct Envelope {
    /// Contract major version ([`SCHEMA_VERSION`] when sent by this crate).
    #[schemars(range(min = 1, max = SCHEMA_VERSION))]
    pub schema: u32,
    /// Unique message id (idempotent delivery). Any UUID is accepted; senders should use
    /// UUIDv7 (time-ordered), as `Envelope::new` does.
    // A UUIDv7 starts with the time in milliseconds, so the ids of messages sent one after
    // another sort near each other: a receiver's index of seen ids grows at its end instead of
    // being written all over (on the server's SQLite, about 1.6x the ingest rate).
    pub id: Uuid,
    /// When the sender created the message.
    pub sent_at: Timestamp,
    /// Kind and body.
    #[serde(flatten)]
    pub message: Message,
}

/// Why a payload is not a valid message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// Larger than [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The `kind` is not one this version knows.
    #[error("unknown message kind {0:?}")]
    UnknownKind(String),
    /// The `schema` major version is newer than this crate's.
    #[error("unsupported schema version {found} (this build speaks {SCHEMA_VERSION})")]
    UnsupportedSchema {
        /// The version found.
        found: u64,
    },
    /// Not JSON, a missing field, a wrong type, or a value over its limit.
    #[error("invalid {kind} message: {source}")]
    Invalid {
        /// The kind being decoded, or `envelope`.
        kind: &'static str,
        /// What serde said.
        source: serde_json::Error,
    },
    /// A value that passes the types but not the rules (e.g. a setting value for another
    /// setting's range).
    #[error("invalid {kind} message: {reason}")]
    Rule {
        /// The kind.
        kind: &'static str,
        /// What rule.
        reason: &'static str,
    },
    /// The message could not be encoded (it would exceed [`MAX_PAYLOAD_BYTES`] or contains a
    /// non-finite number).
    #[error("cannot encode: {0}")]
    Encode(String),
}

#[derive(Deserialize)]
struct RawEnvelope {
    schema: u64,
    id: Uuid,
    sent_at: Timestamp,
    kind: String,
    body: serde_json::Value,
}

/// Turns numbers with no fractional part (`2.0`, `1e2`) into integers. JSON (and JSON Schema's
/// `integer`) does not tell `2.0` from `2`, serde's integer fields do: without this, a
/// schema-valid `"connected_device_count": 2.0` would be refused. Finite-number fields take
/// integers as they take any number. Recursion is bounded by serde_json's nesting limit.
fn integral_floats_to_integers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 {
                if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                    *value = serde_json::Value::from(f as u64);
                } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                    *value = serde_json::Value::from(f as i64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        serde_json::Value::Object(map) => map.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

impl Envelope {
    /// Wraps a message with a fresh id and the current time.
    pub fn new(message: Message) -> Envelope {
        Envelope {
            schema: SCHEMA_VERSION,
            id: Uuid::now_v7(),
            sent_at: Timestamp::now(),
            message,
        }
    }

    /// The kind of its message.
    pub fn kind(&self) -> Kind {
        self.message.kind()
    }

    /// Encodes to JSON bytes.
    pub fn to_json(&self) -> Result<Vec<u8>, ProtoError> {
        let bytes = serde_json::to_vec(self).map_err(|e| ProtoError::Encode(e.to_string()))?;
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(ProtoError::Encode(format!(
                "{} bytes exceeds the maximum of {MAX_PAYLOAD_BYTES}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Decodes JSON bytes, checking size, schema version, kind and every limit.
    pub fn from_json(bytes: &[u8]) -> Result<Envelope, ProtoError> {
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(ProtoError::TooLarge {
                len: bytes.len(),
                max: MAX_PAYLOAD_BYTES,
            });
        }
        let invalid = |source| ProtoError::Invalid {
            kind: "envelope",
            source,
        };
        let mut document: serde_json::Value = serde_json::from_slice(bytes).map_err(invalid)?;
        integral_floats_to_integers(&mut document);
        let raw: RawEnvelope = serde_json::from_value(document).map_err(invalid)?;
        if raw.schema > u64::from(SCHEMA_VERSION) || raw.schema == 0 {
            return Err(ProtoError::UnsupportedSchema { found: raw.schema });
        }
        let kind = Kind::parse(&raw.kind)
            .ok_or_else(|| ProtoError::UnknownKind(raw.kind.chars().take(64).collect()))?;
        let name = kind.as_str();
        fn body<T: serde::de::DeserializeOwned>(
            v: serde_json::Value,
            kind: &'static str,
        ) -> Result<T, ProtoError> {
            serde_json::from_value(v).map_err(|source| ProtoError::Invalid { kind, source })
        }
        let message = match kind {
            Kind::Hello => Message::Hello(body(raw.body, name)?),
            Kind::Snapshot => Message::Snapshot(body(raw.body, name)?),
            Kind::Collection => Message::Collection(Box::new(body(raw.body, name)?)),
            Kind::Event => Message::Event(body(raw.body, name)?),
            Kind::ExceptionLog => Message::ExceptionLog(body(raw.body, name)?),
            Kind::Order => {
                let order: Order = body(raw.body, name)?;
                order
                    .validate()
                    .map_err(|reason| ProtoError::Rule { kind: name, reason })?;
                Message::Order(order)
            }
            Kind::OrderResult => Message::OrderResult(body(raw.body, name)?),
        };
        Ok(Envelope {
            schema: SCHEMA_VERSION,
            id: raw.id,
            sent_at: raw.sent_at,
            message,
        })
    }
}

/// The name a unit enum variant has on the wire (`PowerState::StandbyNetworkOn` is
/// `standby_network_on`), for people-facing output that should say what `--json` says; `?` for
/// a value that is not a bare name.
///
/// ```
/// use epmc_proto::model::PowerState;
/// assert_eq!(epmc_proto::wire_name(&PowerState::StandbyNetworkOn), "standby_network_on");
/// assert_eq!(epmc_proto::wire_name(&42), "?");
/// ```
pub fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

/// The JSON Schemas generated from the types: `(file name, schema)` for the envelope and for
/// each body kind. The committed copies live in `crates/epmc-proto/schema/`.
///
/// The schemas are as strict as the decoder wherever JSON Schema can say so: formats
/// (`date-time`, `uuid`, `ipv4`/`ipv6`), lengths, integer ranges, patterns (no control
/// characters, a setting value that fits its setting), enumerations, and the contract version.
/// Validate with format checking switched on: `format` is only an annotation otherwise.
pub fn schemas() -> Vec<(String, serde_json::Value)> {
    fn one<T: JsonSchema>() -> serde_json::Value {
        let schema = schemars::generate::SchemaSettings::draft2020_12()
            .with_transform(schemars::transform::RecursiveTransform(tighten))
            .into_generator()
            .into_root_schema_for::<T>();
        serde_json::to_value(schema).unwrap_or(serde_json::Value::Null)
    }
    vec![
        ("envelope.schema.json".into(), one::<Envelope>()),
        ("hello.schema.json".into(), one::<AgentHello>()),
        ("snapshot.schema.json".into(), one::<DeviceSnapshot>()),
        ("collection.schema.json".into(), one::<FullCollection>()),
        ("event.schema.json".into(), one::<DeviceEvent>()),
        (
            "exception_log.schema.json".into(),
            one::<AgentExceptionLog>(),
        ),
        ("order.schema.json".into(), one::<Order>()),
        ("order_result.schema.json".into(), one::<OrderResult>()),
    ]
}

/// Makes schemars' integer and IP-address schemas as strict as the decoder: `format: "uint32"`
/// and the like are unknown to validators, so each gets its `maximum`; `format: "ip"` is
/// unknown too, so it becomes "an IPv4 or an IPv6 address".
fn tighten(schema: &mut schemars::Schema) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let maximum = match object.get("format").and_then(serde_json::Value::as_str) {
        Some("uint8") => Some(u64::from(u8::MAX)),
        Some("uint16") => Some(u64::from(u16::MAX)),
        Some("uint32") => Some(u64::from(u32::MAX)),
        Some("ip") => {
            object.remove("format");
            object.insert(
                "anyOf".into(),
                serde_json::json!([{ "format": "ipv4" }, { "format": "ipv6" }]),
            );
            None
        }
        _ => None,
    };
    if let Some(max) = maximum {
        // Keep a tighter maximum set by an attribute.
        let tighter = object
            .get("maximum")
            .and_then(serde_json::Value::as_u64)
            .is_some_and(|m| m <= max);
        if !tighter {
            object.insert("maximum".into(), max.into());
        }
        object.entry("minimum").or_insert(0.into());
    }
}
