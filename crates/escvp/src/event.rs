//! `IMEVENT` notifications and `PWSTATUS?` replies.
//!
//! Both carry the projector status, a warning bit set and an alarm bit set:
//! `IMEVENT=0001 03 00000002 00000000 T1 F1` (event code, status, warnings, alarms, then
//! fields of unknown meaning) and `PWSTATUS=01 00000000 00000000 T1 F1` (the same without the
//! event code). The status codes here are **not** the `PWR?` codes: see [`ImStatus`].

use core::fmt;

use crate::error::ValueError;
use crate::value::PowerCode;

/// Projector status as reported by IMEVENT and PWSTATUS (an open code).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImStatus(u8);

impl ImStatus {
    /// Standby.
    pub const STANDBY: ImStatus = ImStatus(0x01);
    /// Warming up.
    pub const WARM_UP: ImStatus = ImStatus(0x02);
    /// Normal operation (light on).
    pub const NORMAL: ImStatus = ImStatus(0x03);
    /// Cooling down.
    pub const COOL_DOWN: ImStatus = ImStatus(0x04);
    /// Abnormal state (an alarm is active).
    pub const ABNORMAL: ImStatus = ImStatus(0xFF);

    /// Any code.
    pub const fn new(code: u8) -> Self {
        ImStatus(code)
    }

    /// The code.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The name of a known code.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x01 => "STANDBY",
            0x02 => "WARM_UP",
            0x03 => "NORMAL",
            0x04 => "COOL_DOWN",
            0xFF => "ABNORMAL",
            _ => return None,
        })
    }

    /// The `PWR?` code with the same meaning (standby maps to 04, "network on", since the
    /// projector is talking to us). `None` for abnormal and unknown codes.
    pub fn to_power_code(self) -> Option<PowerCode> {
        Some(match self.0 {
            0x01 => PowerCode::STANDBY_NETWORK_ON,
            0x02 => PowerCode::WARM_UP,
            0x03 => PowerCode::ON,
            0x04 => PowerCode::COOL_DOWN,
            _ => return None,
        })
    }
}

impl fmt::Debug for ImStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "ImStatus::{n}"),
            None => write!(f, "ImStatus(0x{:02X})", self.0),
        }
    }
}

macro_rules! bitset {
    ($(#[$m:meta])* $name:ident { $( $(#[$cm:meta])* $c:ident = $bit:expr ),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u32);

        impl $name {
            $( $(#[$cm])* pub const $c: $name = $name(1 << $bit); )*
            /// No bit set.
            pub const NONE: $name = $name(0);

            /// Any bit pattern; unknown bits are kept.
            pub const fn from_bits(bits: u32) -> Self { $name(bits) }
            /// The bits.
            pub const fn bits(self) -> u32 { self.0 }
            /// Whether every bit of `other` is set.
            pub const fn contains(self, other: $name) -> bool { self.0 & other.0 == other.0 }
            /// Whether no bit is set.
            pub const fn is_empty(self) -> bool { self.0 == 0 }
            /// Union.
            pub const fn union(self, other: $name) -> Self { $name(self.0 | other.0) }
            /// The names of the known bits that are set.
            pub fn names(self) -> impl Iterator<Item = &'static str> {
                [$( (stringify!($c), $bit) ),*]
                    .into_iter()
                    .filter(move |(_, b)| self.0 & (1u32 << b) != 0)
                    .map(|(n, _)| n)
            }
            /// The bits that have no name.
            pub const fn unknown_bits(self) -> u32 { self.0 & !(0 $( | (1u32 << $bit) )*) }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut l = f.debug_set();
                for n in self.names() { l.entry(&format_args!("{n}")); }
                if self.unknown_bits() != 0 { l.entry(&format_args!("0x{:08X}", self.unknown_bits())); }
                l.finish()
            }
        }
    };
}

bitset! {
    /// Warning bits (third field).
    Warnings {
        /// Lamp life.
        LAMP_LIFE = 0,
        /// No signal.
        NO_SIGNAL = 1,
        /// Unsupported signal.
        UNSUPPORTED_SIGNAL = 2,
        /// Air filter.
        AIR_FILTER = 3,
        /// High temperature.
        HIGH_TEMPERATURE = 4,
        /// Aspect change (reported by one implementation only).
        ASPECT_CHANGE = 6,
    }
}

bitset! {
    /// Alarm bits (fourth field).
    Alarms {
        /// Lamp did not light.
        LAMP_ON_FAILURE = 0,
        /// Lamp lid open.
        LAMP_LID = 1,
        /// Lamp burnt out.
        LAMP_BURNOUT = 2,
        /// Fan error.
        FAN = 3,
        /// Temperature sensor error.
        TEMPERATURE_SENSOR = 4,
        /// High temperature.
        HIGH_TEMPERATURE = 5,
        /// Interior (system) error.
        INTERIOR = 6,
    }
}

/// A decoded `IMEVENT` or `PWSTATUS` value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StatusReport<'a> {
    /// The event code (`0001` is the only known one); `None` for PWSTATUS.
    pub event_code: Option<u16>,
    /// The projector status.
    pub status: ImStatus,
    /// Active warnings.
    pub warnings: Warnings,
    /// Active alarms.
    pub alarms: Alarms,
    /// Whatever follows the alarm field (e.g. `T1 F1`), unparsed.
    pub extra: &'a str,
}

impl<'a> StatusReport<'a> {
    /// Parses the value of an `IMEVENT=` line (with the event code).
    pub fn parse_imevent(value: &'a str) -> Result<Self, ValueError> {
        Self::parse(value, true)
    }

    /// Parses the value of a `PWSTATUS=` reply (without the event code).
    pub fn parse_pwstatus(value: &'a str) -> Result<Self, ValueError> {
        Self::parse(value, false)
    }

    fn parse(value: &'a str, with_code: bool) -> Result<Self, ValueError> {
        if let Some(report) = Self::parse_canonical(value, with_code) {
            return Ok(report);
        }
        let what = if with_code { "IMEVENT" } else { "PWSTATUS" };
        let bad = || ValueError::parse(what, value, "hex fields: [code] status warnings alarms");
        let mut rest = value;
        let mut next = |digits: usize| {
            let (field, tail) = split_field(rest);
            rest = tail;
            hex_field(field, digits)
        };
        let event_code = if with_code {
            Some(next(4).ok_or_else(bad)? as u16)
        } else {
            None
        };
        let status = ImStatus(next(2).ok_or_else(bad)? as u8);
        let warnings = Warnings(next(8).ok_or_else(bad)?);
        let alarms = Alarms(next(8).ok_or_else(bad)?);
        // Whatever follows the alarm field, with its inner spacing kept.
        let extra = rest.trim_matches(|c: char| c.is_ascii_whitespace());
        Ok(StatusReport {
            event_code,
            status,
            warnings,
            alarms,
            extra,
        })
    }

    /// The layout every projector sends (`CCCC SS WWWWWWWW AAAAAAAA[ extra]`), read by
    /// position; `None` for anything else, which the general parser then handles (and
    /// decides the same for this layout).
    #[inline]
    fn parse_canonical(value: &'a str, with_code: bool) -> Option<Self> {
        let b = value.as_bytes();
        let (event_code, at) = if with_code {
            let code = hex_digits(b.get(..4)?)?;
            (*b.get(4)? == b' ').then_some((Some(code as u16), 5))?
        } else {
            (None, 0)
        };
        let status = hex_digits(b.get(at..at + 2)?)?;
        let warnings = hex_digits(b.get(at + 3..at + 11)?)?;
        let alarms = hex_digits(b.get(at + 12..at + 20)?)?;
        if *b.get(at + 2)? != b' ' || *b.get(at + 11)? != b' ' {
            return None;
        }
        let end = at + 20;
        let extra = match b.get(end) {
            None => "",
            Some(c) if c.is_ascii_whitespace() => value
                .get(end..)?
                .trim_matches(|c: char| c.is_ascii_whitespace()),
            Some(_) => return None,
        };
        Some(StatusReport {
            event_code,
            status: ImStatus(status as u8),
            warnings: Warnings(warnings),
            alarms: Alarms(alarms),
            extra,
        })
    }

    /// Writes the value back in the projector's format (without the `IMEVENT=` key).
    pub fn write_value(&self, out: &mut impl fmt::Write) -> fmt::Result {
        if let Some(code) = self.event_code {
            write!(out, "{code:04X} ")?;
        }
        write!(
            out,
            "{:02X} {:08X} {:08X}",
            self.status.0, self.warnings.0, self.alarms.0
        )?;
        if !self.extra.is_empty() {
            write!(out, " {}", self.extra)?;
        }
        Ok(())
    }
}

/// Splits off the first whitespace-separated field.
fn split_field(s: &str) -> (&str, &str) {
    let s = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let end = s
        .bytes()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(s.len());
    s.split_at(end)
}

/// The value of 1 to 8 hex digits.
#[inline]
fn hex_digits(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |acc, &b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        Some(acc << 4 | u32::from(d))
    })
}

fn hex_field(s: &str, max_digits: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_digits {
        return None;
    }
    hex_digits(s.as_bytes())
}

/// An `IMEVENT` line as received.
///
/// Decoding a reply stream only finds the line; [`report`](Self::report) decodes its fields
/// on demand (so that a reply stream decodes without work it may not need). A malformed
/// IMEVENT from a device is still surfaced, as an event whose report is an error, instead of
/// killing the session.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StatusEvent<'a> {
    raw: &'a str,
}

impl<'a> StatusEvent<'a> {
    /// The event with this value (the text after `IMEVENT=`).
    pub fn new(raw: &'a str) -> Self {
        StatusEvent { raw }
    }

    /// The text after `IMEVENT=`.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The decoded report, or why it could not be decoded.
    pub fn report(&self) -> Result<StatusReport<'a>, ValueError> {
        StatusReport::parse_imevent(self.raw)
    }
}

impl fmt::Debug for StatusEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.report() {
            Ok(r) => r.fmt(f),
            Err(_) => write!(f, "Malformed({:?})", self.raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_sample() {
        let r = StatusReport::parse_imevent("0001 03 00000002 00000000 T1 F1").unwrap();
        assert_eq!(r.event_code, Some(1));
        assert_eq!(r.status, ImStatus::NORMAL);
        assert!(r.warnings.contains(Warnings::NO_SIGNAL));
        assert!(r.alarms.is_empty());
        assert_eq!(r.extra, "T1 F1");
        assert_eq!(r.status.to_power_code(), Some(PowerCode::ON));
        let mut s = String::new();
        r.write_value(&mut s).unwrap();
        assert_eq!(s, "0001 03 00000002 00000000 T1 F1");
    }

    #[test]
    fn pwstatus_and_errors() {
        let r = StatusReport::parse_pwstatus("01 00000000 00000028 T1 F1").unwrap();
        assert_eq!(r.event_code, None);
        assert_eq!(r.status, ImStatus::STANDBY);
        assert!(
            r.alarms
                .contains(Alarms::FAN.union(Alarms::HIGH_TEMPERATURE))
        );
        assert_eq!(
            r.alarms.names().collect::<Vec<_>>(),
            ["FAN", "HIGH_TEMPERATURE"]
        );
        assert!(StatusReport::parse_imevent("0001 03 0000000G 00000000").is_err());
        assert!(StatusReport::parse_imevent("0001 03").is_err());
        assert!(StatusReport::parse_imevent("").is_err());
        assert!(StatusReport::parse_imevent("00001 03 00000000 00000000").is_err());
    }
}
