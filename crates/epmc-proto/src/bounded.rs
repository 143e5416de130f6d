//! Validated building blocks: bounded strings and lists, timestamps, ids, hex codes.
//!
//! Every limit is enforced when decoding (serde `try_from`), so a message that decodes is
//! within its documented bounds, and appears in the generated JSON Schema
//! (`maxLength`, `maxItems`, `pattern`).

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A limit was exceeded or a value is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BoundError {
    /// A string is longer than allowed.
    #[error("string of {len} characters; at most {max} allowed")]
    TooLong {
        /// Its length in characters.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A list has more items than allowed.
    #[error("list of {len} items; at most {max} allowed")]
    TooMany {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A string contains a control character.
    #[error("control character in text")]
    ControlChar,
    /// A value does not have the required form.
    #[error("{0}")]
    Malformed(&'static str),
}

/// The JSON Schema pattern of text without control characters (Unicode category Cc) other
/// than tab and newline: what [`BoundedString::new`] accepts.
pub const NO_CONTROL_CHARS: &str = "^[^\\x00-\\x08\\x0B-\\x1F\\x7F-\\x9F]*$";

/// A string of at most `MAX` characters without control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BoundedString<const MAX: usize>(String);

impl<const MAX: usize> BoundedString<MAX> {
    /// Validates a string.
    pub fn new(s: impl Into<String>) -> Result<Self, BoundError> {
        let s = s.into();
        let len = s.chars().count();
        if len > MAX {
            return Err(BoundError::TooLong { len, max: MAX });
        }
        if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(BoundError::ControlChar);
        }
        Ok(BoundedString(s))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> fmt::Debug for BoundedString<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<const MAX: usize> fmt::Display for BoundedString<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const MAX: usize> TryFrom<&str> for BoundedString<MAX> {
    type Error = BoundError;
    fn try_from(s: &str) -> Result<Self, BoundError> {
        BoundedString::new(s)
    }
}

impl<const MAX: usize> Serialize for BoundedString<MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for BoundedString<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        BoundedString::new(s.into_owned()).map_err(serde::de::Error::custom)
    }
}

impl<const MAX: usize> JsonSchema for BoundedString<MAX> {
    fn schema_name() -> Cow<'static, str> {
        format!("String{MAX}").into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "maxLength": MAX, "pattern": NO_CONTROL_CHARS })
    }
}

/// A list of at most `MAX` items.
#[derive(Clone, PartialEq, Debug)]
pub struct BoundedVec<T, const MAX: usize>(Vec<T>);

impl<T, const MAX: usize> Default for BoundedVec<T, MAX> {
    fn default() -> Self {
        BoundedVec(Vec::new())
    }
}

impl<T, const MAX: usize> BoundedVec<T, MAX> {
    /// Validates a list.
    pub fn new(items: Vec<T>) -> Result<Self, BoundError> {
        if items.len() > MAX {
            return Err(BoundError::TooMany {
                len: items.len(),
                max: MAX,
            });
        }
        Ok(BoundedVec(items))
    }

    /// An empty list.
    pub fn empty() -> Self {
        BoundedVec(Vec::new())
    }

    /// The items.
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends an item if there is room; gives it back otherwise.
    pub fn push(&mut self, item: T) -> Result<(), T> {
        if self.0.len() >= MAX {
            return Err(item);
        }
        self.0.push(item);
        Ok(())
    }
}

impl<T: Serialize, const MAX: usize> Serialize for BoundedVec<T, MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for BoundedVec<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<T, const MAX: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de> for Visitor<T, MAX> {
            type Value = BoundedVec<T, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX} items")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                // Refuse as soon as the limit is passed, before reading the rest.
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX).min(1024));
                while let Some(item) = seq.next_element()? {
                    if items.len() == MAX {
                        return Err(serde::de::Error::custom(BoundError::TooMany {
                            len: MAX + 1,
                            max: MAX,
                        }));
                    }
                    items.push(item);
                }
                Ok(BoundedVec(items))
            }
        }
        d.deserialize_seq(Visitor::<T, MAX>(std::marker::PhantomData))
    }
}

impl<T: JsonSchema, const MAX: usize> JsonSchema for BoundedVec<T, MAX> {
    fn schema_name() -> Cow<'static, str> {
        format!("ListOf{}Max{MAX}", T::schema_name()).into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let items = generator.subschema_for::<T>();
        json_schema!({ "type": "array", "items": items, "maxItems": MAX })
    }
}

/// A point in time, RFC 3339 on the wire (e.g. `2026-11-24T12:30:00Z`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    /// Wraps a time.
    pub fn new(t: OffsetDateTime) -> Self {
        Timestamp(t)
    }

    /// Now (UTC).
    pub fn now() -> Self {
        Timestamp(OffsetDateTime::now_utc())
    }

    /// From seconds since the Unix epoch.
    pub fn from_unix(seconds: i64) -> Result<Self, BoundError> {
        OffsetDateTime::from_unix_timestamp(seconds)
            .map(Timestamp)
            .map_err(|_| BoundError::Malformed("timestamp out of range"))
    }

    /// Seconds since the Unix epoch.
    pub fn unix(&self) -> i64 {
        self.0.unix_timestamp()
    }

    /// The time.
    pub fn get(&self) -> OffsetDateTime {
        self.0
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.format(&Rfc3339) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "{}", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.0.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        if s.len() > 64 {
            return Err(serde::de::Error::custom("timestamp too long"));
        }
        OffsetDateTime::parse(&s, &Rfc3339)
            .map(Timestamp)
            .map_err(|_| serde::de::Error::custom("expected an RFC 3339 timestamp"))
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> Cow<'static, str> {
        "Timestamp".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "format": "date-time", "maxLength": 64 })
    }
}

/// A two-digit upper-case hexadecimal device code (`PWR?`, `SOURCE`, `ERR?`, `CMODE`…), as
/// the projector reports it: `"30"`, `"A0"`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HexCode(u8);

impl HexCode {
    /// Wraps a code.
    pub const fn new(code: u8) -> Self {
        HexCode(code)
    }

    /// The code.
    pub const fn get(self) -> u8 {
        self.0
    }
}

impl fmt::Debug for HexCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02X}", self.0)
    }
}

impl Serialize for HexCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:02X}", self.0))
    }
}

impl<'de> Deserialize<'de> for HexCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        if s.len() != 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(serde::de::Error::custom("expected two hex digits"));
        }
        u8::from_str_radix(&s, 16)
            .map(HexCode)
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for HexCode {
    fn schema_name() -> Cow<'static, str> {
        "HexCode".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "pattern": "^[0-9A-Fa-f]{2}$" })
    }
}

/// A finite number. JSON numbers that are not finite as `f32` (e.g. `1e40`) are refused on
/// decode instead of silently becoming infinity (which would encode as `null`, i.e. "absent").
#[derive(Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Real(f32);

impl Real {
    /// A finite value.
    pub fn new(value: f32) -> Result<Self, BoundError> {
        if value.is_finite() {
            Ok(Real(value))
        } else {
            Err(BoundError::Malformed("number is not finite"))
        }
    }

    /// The value.
    pub fn get(self) -> f32 {
        self.0
    }
}

impl fmt::Debug for Real {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for Real {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f32(self.0)
    }
}

impl<'de> Deserialize<'de> for Real {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v.abs() > f64::from(f32::MAX) {
            return Err(serde::de::Error::custom("number out of range"));
        }
        Real::new(v as f32).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Real {
    fn schema_name() -> Cow<'static, str> {
        "Real".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "number", "minimum": -f32::MAX, "maximum": f32::MAX })
    }
}
