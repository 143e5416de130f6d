//! Typed ESC/VP21 values and the properties that carry them.
//!
//! Device codes (power, source, error, colour mode…) are open newtypes: every value decodes,
//! known ones have named constants and `Debug` names them, unknown ones print in hex and
//! round-trip unchanged. Each [`Property`] ties a command name to its value type, so a client
//! can offer `get::<Power>()` and `set::<Source>(SourceCode::HDMI2)`.

use core::fmt;
use core::time::Duration;

use crate::error::{ValueError, check_text};
use crate::event::StatusReport;
use crate::vp21::{Command, Name, Param};

/// A value that travels as the text of an ESC/VP21 parameter or reply.
pub trait WireValue: Sized {
    /// Parses a reply value (the text after `KEY=`).
    fn parse_value(text: &str) -> Result<Self, ValueError>;
    /// The parameter text for a set command.
    fn to_param(&self) -> String;
}

/// A projector property: a command name and the type of its value.
pub trait Property {
    /// The command name, e.g. `PWR`.
    const NAME: &'static str;
    /// The value type.
    type Value: WireValue;

    /// The query command `NAME?`.
    fn query() -> Command {
        Command::Query(Name::from_static(Self::NAME))
    }

    /// The set command `NAME value`.
    fn set(value: &Self::Value) -> Result<Command, ValueError> {
        Ok(Command::Set(
            Name::from_static(Self::NAME),
            Param::new(&value.to_param())?,
        ))
    }
}

macro_rules! hex_code {
    (
        $(#[$meta:meta])*
        $name:ident, $what:expr, { $( $(#[$cm:meta])* $c:ident = $v:expr ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u8);

        impl $name {
            $( $(#[$cm])* pub const $c: $name = $name($v); )*

            /// Any code.
            pub const fn new(code: u8) -> Self { $name(code) }
            /// The code.
            pub const fn get(self) -> u8 { self.0 }
            /// The name of a known code.
            pub fn name(self) -> Option<&'static str> {
                match self.0 { $( $v => Some(stringify!($c)), )* _ => None }
            }
        }

        impl WireValue for $name {
            fn parse_value(text: &str) -> Result<Self, ValueError> {
                parse_hex2(text).map($name).ok_or_else(|| ValueError::parse($what, text, "two hex digits"))
            }
            fn to_param(&self) -> String { format!("{:02X}", self.0) }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => write!(f, "{}::{}", stringify!($name), n),
                    None => write!(f, "{}(0x{:02X})", stringify!($name), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:02X}", self.0)
            }
        }
    };
}

fn parse_hex2(text: &str) -> Option<u8> {
    let t = text.trim();
    if t.len() != 2 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(t, 16).ok()
}

hex_code! {
    /// `PWR?` power codes. Not the IMEVENT status codes ([`crate::event::ImStatus`]).
    PowerCode, "PWR", {
        /// Standby, network off.
        STANDBY_NETWORK_OFF = 0x00,
        /// Light on, normal operation.
        ON = 0x01,
        /// Warming up.
        WARM_UP = 0x02,
        /// Cooling down.
        COOL_DOWN = 0x03,
        /// Standby, network on.
        STANDBY_NETWORK_ON = 0x04,
        /// Abnormal standby.
        ABNORMAL_STANDBY = 0x05,
        /// WirelessHD standby.
        WIRELESS_HD_STANDBY = 0x07,
        /// A/V standby.
        AV_STANDBY = 0x09,
    }
}

impl PowerCode {
    /// Whether the light is on.
    pub fn is_on(self) -> bool {
        self == PowerCode::ON
    }

    /// Whether the projector is in one of the standby states.
    pub fn is_standby(self) -> bool {
        matches!(self.0, 0x00 | 0x04 | 0x05 | 0x07 | 0x09)
    }
}

hex_code! {
    /// `SOURCE` input codes (model-dependent; prefer the projector's own `SOURCELIST?`).
    SourceCode, "SOURCE", {
        /// Computer 1.
        COMPUTER1 = 0x10,
        /// Computer 1, auto.
        COMPUTER1_AUTO = 0x1F,
        /// Computer 2.
        COMPUTER2 = 0x20,
        /// Computer 2, auto.
        COMPUTER2_AUTO = 0x2F,
        /// HDMI 1.
        HDMI1 = 0x30,
        /// Video.
        VIDEO = 0x40,
        /// Video (RCA).
        VIDEO_RCA = 0x41,
        /// S-Video.
        S_VIDEO = 0x42,
        /// USB Display.
        USB_DISPLAY = 0x51,
        /// USB viewer.
        USB = 0x52,
        /// LAN.
        LAN = 0x53,
        /// Screen mirroring.
        SCREEN_MIRRORING = 0x56,
        /// DisplayPort.
        DISPLAYPORT = 0x70,
        /// HDBaseT.
        HDBASET = 0x80,
        /// HDMI 2.
        HDMI2 = 0xA0,
        /// BNC.
        BNC = 0xB1,
        /// WirelessHD.
        WIRELESS_HD = 0xD0,
        /// Cycle through all sources.
        CYCLE = 0xF0,
    }
}

hex_code! {
    /// `ERR?` error codes.
    ErrorCode, "ERR", {
        /// No error, or the error was recovered.
        NONE = 0x00,
        /// Fan error.
        FAN = 0x01,
        /// Lamp failure at power on.
        LAMP_AT_POWER_ON = 0x03,
        /// High internal temperature.
        HIGH_TEMPERATURE = 0x04,
        /// Lamp (laser) error.
        LAMP = 0x06,
        /// Lamp cover door open.
        LAMP_COVER_OPEN = 0x07,
        /// Cinema filter error.
        CINEMA_FILTER = 0x08,
        /// Electric dual-layered capacitor disconnected.
        CAPACITOR = 0x09,
        /// Auto iris error.
        AUTO_IRIS = 0x0A,
        /// Subsystem error.
        SUBSYSTEM = 0x0B,
        /// Low air flow.
        LOW_AIR_FLOW = 0x0C,
        /// Air filter air-flow sensor error.
        AIR_FLOW_SENSOR = 0x0D,
        /// Power supply unit (ballast) error.
        POWER_SUPPLY = 0x0E,
        /// Shutter error.
        SHUTTER = 0x0F,
        /// Cooling system error (Peltier element).
        COOLING_PELTIER = 0x10,
        /// Cooling system error (pump).
        COOLING_PUMP = 0x11,
        /// Static iris error.
        STATIC_IRIS = 0x12,
        /// Power supply unit error (disagreement of ballast).
        POWER_SUPPLY_MISMATCH = 0x13,
        /// Exhaust shutter error.
        EXHAUST_SHUTTER = 0x14,
        /// Obstacle detection error.
        OBSTACLE = 0x15,
        /// IF board discernment error.
        IF_BOARD = 0x16,
        /// Stack projection communication error.
        STACKING = 0x17,
        /// I2C error.
        I2C = 0x18,
        /// Lens shift error.
        LENS_SHIFT = 0x1A,
        /// Quartz/polarizer error.
        POLARIZER = 0x1B,
        /// No lens.
        NO_LENS = 0x1C,
        /// Subsystem error 2.
        SUBSYSTEM2 = 0x1D,
        /// Power supply voltage error.
        SUPPLY_VOLTAGE = 0x1E,
        /// Other error.
        OTHER = 0x1F,
        /// Other error (some laser models).
        OTHER_FF = 0xFF,
    }
}

hex_code! {
    /// `CMODE` colour modes (home and business models share one code space).
    ColorMode, "CMODE", {
        /// Auto.
        AUTO = 0x00,
        /// sRGB.
        SRGB = 0x01,
        /// Normal.
        NORMAL = 0x02,
        /// Meeting.
        MEETING = 0x03,
        /// Presentation.
        PRESENTATION = 0x04,
        /// Theatre.
        THEATRE = 0x05,
        /// Dynamic.
        DYNAMIC = 0x06,
        /// Natural.
        NATURAL = 0x07,
        /// Sports.
        SPORTS = 0x08,
        /// Bright cinema / living.
        BRIGHT_CINEMA = 0x0C,
        /// Game.
        GAME = 0x0D,
        /// Custom.
        CUSTOM = 0x10,
        /// Blackboard.
        BLACKBOARD = 0x11,
        /// Whiteboard.
        WHITEBOARD = 0x12,
        /// Photo.
        PHOTO = 0x14,
        /// Cinema.
        CINEMA = 0x15,
        /// Digital cinema.
        DIGITAL_CINEMA = 0x22,
    }
}

hex_code! {
    /// `LUMINANCE` light-source modes.
    LuminanceMode, "LUMINANCE", {
        /// Normal / high.
        NORMAL = 0x00,
        /// ECO / low.
        ECO = 0x01,
        /// Medium.
        MEDIUM = 0x02,
    }
}

hex_code! {
    /// `ASPECT` modes.
    AspectMode, "ASPECT", {
        /// Normal.
        NORMAL = 0x00,
        /// Auto (older code).
        AUTO20 = 0x20,
        /// Auto.
        AUTO = 0x30,
        /// Full.
        FULL = 0x40,
        /// Zoom.
        ZOOM = 0x50,
        /// Native.
        NATIVE = 0x60,
        /// Wide.
        WIDE = 0x70,
        /// Anamorphic wide.
        ANAMORPHIC = 0x80,
        /// Horizontal squeeze.
        SQUEEZE = 0x90,
    }
}

hex_code! {
    /// `SIGNAL?` states (meaning is model-dependent: on laser business models 01 is "signal",
    /// on home models 01 is 2D and 02 is 3D).
    SignalState, "SIGNAL", {
        /// No signal.
        NONE = 0x00,
        /// Signal detected.
        DETECTED = 0x01,
        /// 3D signal (home models).
        THREE_D = 0x02,
        /// Not supported (home models).
        NOT_SUPPORTED = 0x03,
        /// Unsupported signal.
        UNSUPPORTED = 0xFF,
    }
}

hex_code! {
    /// `MSEL` what the screen shows while A/V mute is on.
    MuteScreen, "MSEL", {
        /// Black.
        BLACK = 0x00,
        /// Blue.
        BLUE = 0x01,
        /// User logo.
        LOGO = 0x02,
    }
}

hex_code! {
    /// `KEY` remote-control key codes (ESC/VP21 operands, not the HTTP IR codes).
    KeyCode, "KEY", {
        /// Power.
        POWER = 0x01,
        /// Menu.
        MENU = 0x03,
        /// Escape.
        ESC = 0x05,
        /// Enter.
        ENTER = 0x16,
        /// Up.
        UP = 0x35,
        /// Down.
        DOWN = 0x36,
        /// Left.
        LEFT = 0x37,
        /// Right.
        RIGHT = 0x38,
        /// Source.
        SOURCE = 0x48,
    }
}

/// `ON`/`OFF` switches (`MUTE`, `FREEZE`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum OnOff {
    /// `ON`.
    On,
    /// `OFF`.
    Off,
}

impl OnOff {
    /// `true` for `On`.
    pub fn is_on(self) -> bool {
        self == OnOff::On
    }
}

impl From<bool> for OnOff {
    fn from(on: bool) -> Self {
        if on { OnOff::On } else { OnOff::Off }
    }
}

impl WireValue for OnOff {
    fn parse_value(text: &str) -> Result<Self, ValueError> {
        match text.trim() {
            "ON" => Ok(OnOff::On),
            "OFF" => Ok(OnOff::Off),
            _ => Err(ValueError::parse("ON/OFF", text, "ON or OFF")),
        }
    }
    fn to_param(&self) -> String {
        match self {
            OnOff::On => "ON".into(),
            OnOff::Off => "OFF".into(),
        }
    }
}

/// A decimal number (`ONTIME`, `VOL`, `LUMLEVEL`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Number(pub u32);

impl WireValue for Number {
    fn parse_value(text: &str) -> Result<Self, ValueError> {
        let t = text.trim();
        if t.is_empty() || t.len() > 10 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValueError::parse("number", text, "decimal digits"));
        }
        t.parse()
            .map(Number)
            .map_err(|_| ValueError::parse("number", text, "a 32-bit decimal number"))
    }
    fn to_param(&self) -> String {
        self.0.to_string()
    }
}

/// `LAMP?`: hours of each lamp or light source (one field per source, space-separated).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LampHours(Vec<u32>);

impl LampHours {
    /// At most this many light sources are accepted.
    pub const MAX_SOURCES: usize = 8;

    /// Hours per light source (at least one, at most [`Self::MAX_SOURCES`]).
    pub fn new(hours: Vec<u32>) -> Result<Self, ValueError> {
        if hours.is_empty() {
            return Err(ValueError::Empty { what: "LAMP" });
        }
        if hours.len() > Self::MAX_SOURCES {
            return Err(ValueError::TooLong {
                what: "LAMP",
                len: hours.len(),
                max: Self::MAX_SOURCES,
            });
        }
        Ok(LampHours(hours))
    }

    /// Hours of each light source.
    pub fn hours(&self) -> &[u32] {
        &self.0
    }

    /// Hours of the first light source.
    pub fn first(&self) -> u32 {
        self.0.first().copied().unwrap_or(0)
    }
}

impl WireValue for LampHours {
    fn parse_value(text: &str) -> Result<Self, ValueError> {
        let mut hours = Vec::new();
        for f in text.split_ascii_whitespace() {
            if hours.len() == Self::MAX_SOURCES {
                return Err(ValueError::TooLong {
                    what: "LAMP",
                    len: text.split_ascii_whitespace().count(),
                    max: Self::MAX_SOURCES,
                });
            }
            hours.push(
                Number::parse_value(f)
                    .map_err(|_| ValueError::parse("LAMP", text, "decimal hours per light source"))?
                    .0,
            );
        }
        LampHours::new(hours)
    }
    fn to_param(&self) -> String {
        self.0
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Free text (`SNO`, `PJINFO`): printable ASCII, at most 64 characters.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Text(String);

impl Text {
    /// The longest text accepted.
    pub const MAX_LEN: usize = 64;

    /// Validates text.
    pub fn new(text: &str) -> Result<Self, ValueError> {
        check_text("text value", text, Self::MAX_LEN, true, |c| {
            (c.is_ascii_graphic() || c == ' ') && c != ':'
        })?;
        Ok(Text(text.to_owned()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl WireValue for Text {
    fn parse_value(text: &str) -> Result<Self, ValueError> {
        Text::new(text.trim())
    }
    fn to_param(&self) -> String {
        self.0.clone()
    }
}

/// `SOURCELIST?`: the inputs this projector has, as code/name pairs
/// (`30 HDMI1 A0 HDMI2 53 LAN`).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct SourceList(Vec<(SourceCode, String)>);

impl SourceList {
    /// At most this many entries are accepted.
    pub const MAX_ENTRIES: usize = 64;

    /// Builds a list; names must be single words of printable ASCII.
    pub fn new(entries: Vec<(SourceCode, String)>) -> Result<Self, ValueError> {
        if entries.len() > Self::MAX_ENTRIES {
            return Err(ValueError::TooLong {
                what: "SOURCELIST",
                len: entries.len(),
                max: Self::MAX_ENTRIES,
            });
        }
        for (_, name) in &entries {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(ValueError::parse(
                    "SOURCELIST",
                    name,
                    "a one-word source name",
                ));
            }
        }
        Ok(SourceList(entries))
    }

    /// The entries.
    pub fn entries(&self) -> &[(SourceCode, String)] {
        &self.0
    }

    /// Whether the list offers `code`.
    pub fn contains(&self, code: SourceCode) -> bool {
        self.0.iter().any(|(c, _)| *c == code)
    }

    /// The name of `code`, if listed.
    pub fn name_of(&self, code: SourceCode) -> Option<&str> {
        self.0
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, n)| n.as_str())
    }
}

impl WireValue for SourceList {
    fn parse_value(text: &str) -> Result<Self, ValueError> {
        let fields: Vec<&str> = text.split_ascii_whitespace().collect();
        if !fields.len().is_multiple_of(2) {
            return Err(ValueError::parse("SOURCELIST", text, "code/name pairs"));
        }
        let mut entries = Vec::with_capacity(fields.len() / 2);
        for pair in fields.chunks_exact(2) {
            let code = SourceCode::parse_value(pair[0])
                .map_err(|_| ValueError::parse("SOURCELIST", text, "code/name pairs"))?;
            entries.push((code, pair[1].to_owned()));
        }
        SourceList::new(entries)
    }
    fn to_param(&self) -> String {
        self.0
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `PWSTATUS?`: status, warnings and alarms (owned form of [`StatusReport`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PowerStatus {
    /// Status, warnings and alarms; `extra` holds the trailing fields.
    pub status: crate::event::ImStatus,
    /// Warnings.
    pub warnings: crate::event::Warnings,
    /// Alarms.
    pub alarms: crate::event::Alarms,
    /// The trailing fields of unknown meaning.
    pub extra: String,
}

impl WireValue for PowerStatus {
    fn parse_value(text: &str) -> Result<Self, ValueError> {
        let r = StatusReport::parse_pwstatus(text)?;
        Ok(PowerStatus {
            status: r.status,
            warnings: r.warnings,
            alarms: r.alarms,
            extra: r.extra.to_owned(),
        })
    }
    fn to_param(&self) -> String {
        let mut s = String::new();
        let r = StatusReport {
            event_code: None,
            status: self.status,
            warnings: self.warnings,
            alarms: self.alarms,
            extra: &self.extra,
        };
        // Writing to a String cannot fail.
        let _ = r.write_value(&mut s);
        s
    }
}

macro_rules! property {
    ($(#[$m:meta])* $name:ident = $cmd:literal : $ty:ty) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name;
        impl Property for $name {
            const NAME: &'static str = $cmd;
            type Value = $ty;
        }
    };
}

property!(/// `PWR`: power state (set with [`PowerCommand`]).
    Power = "PWR": PowerCode);
property!(/// `SOURCE`: the selected input.
    Source = "SOURCE": SourceCode);
property!(/// `SOURCELIST`: the inputs the projector has (query only).
    SourceListProperty = "SOURCELIST": SourceList);
property!(/// `MUTE`: A/V mute.
    Mute = "MUTE": OnOff);
property!(/// `MSEL`: what A/V mute shows.
    MuteSelect = "MSEL": MuteScreen);
property!(/// `LAMP`: light-source hours (query only).
    Lamp = "LAMP": LampHours);
property!(/// `ONTIME`: operation hours (query only).
    OnTime = "ONTIME": Number);
property!(/// `SNO`: serial number (query only).
    SerialNumber = "SNO": Text);
property!(/// `ERR`: the current error code (query only).
    Error = "ERR": ErrorCode);
property!(/// `VOL`: volume, raw 0-255 (steps are model-dependent).
    Volume = "VOL": Number);
property!(/// `CMODE`: colour mode.
    ColorModeProperty = "CMODE": ColorMode);
property!(/// `LUMINANCE`: light-source mode.
    Luminance = "LUMINANCE": LuminanceMode);
property!(/// `LUMLEVEL`: light level 0-255 (laser models).
    LumLevel = "LUMLEVEL": Number);
property!(/// `ASPECT`: aspect mode.
    Aspect = "ASPECT": AspectMode);
property!(/// `SIGNAL`: input signal state (query only).
    Signal = "SIGNAL": SignalState);
property!(/// `PWSTATUS`: status, warnings and alarms (query only).
    PwStatus = "PWSTATUS": PowerStatus);
property!(/// `FREEZE`: picture freeze.
    Freeze = "FREEZE": OnOff);
property!(/// `KEY`: press a remote-control key (set only).
    Key = "KEY": KeyCode);
property!(/// `PJINFO`: model information (query only).
    ProjectorInfo = "PJINFO": Text);

/// `PWR ON` / `PWR OFF`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PowerCommand {
    /// `PWR ON`: the colon comes after warm-up.
    On,
    /// `PWR OFF`.
    Off,
}

impl PowerCommand {
    /// The command.
    pub fn command(self) -> Command {
        let p = match self {
            PowerCommand::On => "ON",
            PowerCommand::Off => "OFF",
        };
        Command::Set(Name::from_static("PWR"), Param::from_static(p))
    }
}

/// How long a projector may take to answer a command, from the ESC/VP21 guide's timing
/// rules, and how long to stay quiet after it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Timing {
    /// Longest time to wait for the colon.
    pub reply_within: Duration,
    /// Time to send nothing after the colon (after `PWR OFF`, projectors can wedge their
    /// network interface if spoken to at once).
    pub quiet_after: Duration,
}

impl Timing {
    /// `PWR ON`: the colon comes after warm-up, up to 40/70/100 s with ignition retries.
    pub const POWER_ON: Timing = Timing {
        reply_within: Duration::from_secs(100),
        quiet_after: Duration::ZERO,
    };
    /// `PWR OFF`: up to 50 s, then 10 s of silence.
    pub const POWER_OFF: Timing = Timing {
        reply_within: Duration::from_secs(50),
        quiet_after: Duration::from_secs(10),
    };
    /// `SOURCE x`: up to 5 s.
    pub const SOURCE: Timing = Timing {
        reply_within: Duration::from_secs(5),
        quiet_after: Duration::ZERO,
    };
    /// Everything else: up to 3 s.
    pub const OTHER: Timing = Timing {
        reply_within: Duration::from_secs(3),
        quiet_after: Duration::ZERO,
    };

    /// The timing class of a command.
    pub fn of(command: &Command) -> Timing {
        match command {
            Command::Set(n, p) if n.as_str() == "PWR" => match p.as_str() {
                "ON" => Timing::POWER_ON,
                "OFF" => Timing::POWER_OFF,
                _ => Timing::OTHER,
            },
            Command::Set(n, _) if n.as_str() == "SOURCE" => Timing::SOURCE,
            _ => Timing::OTHER,
        }
    }
}

impl Command {
    /// The timing class of this command (see [`Timing::of`]).
    pub fn timing(&self) -> Timing {
        Timing::of(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_name() {
        assert_eq!(PowerCode::parse_value("01").unwrap(), PowerCode::ON);
        assert_eq!(format!("{:?}", PowerCode::new(6)), "PowerCode(0x06)");
        assert_eq!(format!("{:?}", SourceCode::HDMI2), "SourceCode::HDMI2");
        assert_eq!(SourceCode::new(0xA0).to_param(), "A0");
        assert_eq!(SourceCode::parse_value("a0").unwrap(), SourceCode::HDMI2);
        assert!(PowerCode::parse_value("1").is_err());
        assert!(PowerCode::parse_value("0G").is_err());
    }

    #[test]
    fn compound_values() {
        let l = LampHours::parse_value("1633 1633").unwrap();
        assert_eq!(l.hours(), &[1633, 1633]);
        assert_eq!(l.to_param(), "1633 1633");
        assert!(LampHours::parse_value("").is_err());
        assert!(LampHours::parse_value("12x").is_err());
        let s = SourceList::parse_value("30 HDMI1 A0 HDMI2").unwrap();
        assert!(s.contains(SourceCode::HDMI2));
        assert_eq!(s.name_of(SourceCode::HDMI1), Some("HDMI1"));
        assert_eq!(s.to_param(), "30 HDMI1 A0 HDMI2");
        assert!(SourceList::parse_value("30").is_err());
        let p = PowerStatus::parse_value("01 00000000 00000000 T1 F1").unwrap();
        assert_eq!(p.to_param(), "01 00000000 00000000 T1 F1");
    }

    #[test]
    fn properties_build_commands() {
        assert_eq!(Power::query().to_bytes(), b"PWR?\r");
        assert_eq!(
            Source::set(&SourceCode::HDMI1).unwrap().to_bytes(),
            b"SOURCE 30\r"
        );
        assert_eq!(Mute::set(&OnOff::On).unwrap().to_bytes(), b"MUTE ON\r");
        assert_eq!(PowerCommand::On.command().to_bytes(), b"PWR ON\r");
        assert_eq!(PowerCommand::On.command().timing(), Timing::POWER_ON);
        assert_eq!(
            PowerCommand::Off.command().timing().quiet_after,
            Duration::from_secs(10)
        );
        assert_eq!(
            Source::set(&SourceCode::LAN).unwrap().timing(),
            Timing::SOURCE
        );
        assert_eq!(Power::query().timing(), Timing::OTHER);
    }
}
