//! The message bodies: every data item of the white paper's appendix, typed.
//!
//! Conventions: units are in field names (`_hours`, `_celsius`, `_rpm`, `_volts`, `_minutes`,
//! `_seconds`); a value the device did not report is absent (`None`, omitted from the JSON),
//! never a made-up zero; device codes keep the projector's two-digit hex (`HexCode`) beside a
//! readable name where one is known.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bounded::{BoundedString, BoundedVec, HexCode, Real, Timestamp};

/// Short names and identifiers: at most 64 characters.
pub type Name = BoundedString<64>;
/// Free text such as comments and messages: at most 1000 characters.
pub type Text = BoundedString<1000>;

/// Identifies a projector within an agent: its serial number (`SNO?`) when known, which stays
/// stable across address changes, or `ip:<address>` until the serial has been read.
pub type DeviceId = BoundedString<64>;

/// Most devices one agent reports.
pub const MAX_DEVICES: usize = 4096;
/// Most samples in a history series (a year of hourly samples).
pub const MAX_SERIES_SAMPLES: usize = 8784;
/// Most records in an error or warning history.
pub const MAX_HISTORY_RECORDS: usize = 2000;
/// Most sensors of one kind (temperatures, fans).
pub const MAX_SENSORS: usize = 16;
/// Most exception-log entries in one message.
pub const MAX_LOG_ENTRIES: usize = 200;
/// Most inputs one projector lists (`SOURCELIST?`).
pub const MAX_SOURCES: usize = 64;

// ---- agent ---------------------------------------------------------------------------------

/// `hello`: who the agent is, sent on every connect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentHello {
    /// Product code of the agent software, e.g. `epmc-agent`.
    pub agent_code: Name,
    /// Agent software version (semantic version).
    pub version: Name,
    /// The agent's identifier (its certificate CN).
    pub agent_id: Uuid,
    /// Number of projectors the agent currently manages.
    pub connected_device_count: u32,
    /// Locale of the agent's host, e.g. `de_DE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<Name>,
    /// Language of the agent's user interface, e.g. `de`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<Name>,
    /// Device settings held in the agent, one entry per managed device.
    #[serde(default)]
    pub devices: BoundedVec<AgentDeviceSettings, MAX_DEVICES>,
}

/// Settings the agent keeps for a device (not stored in the projector).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentDeviceSettings {
    /// The device.
    pub device_id: DeviceId,
    /// Display name chosen by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<Name>,
    /// Group the device belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<Name>,
    /// Operator's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<Text>,
}

/// Severity of an agent exception-log entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Informational.
    Info,
    /// Something went wrong but the agent carried on.
    Warning,
    /// An operation failed.
    Error,
}

/// One exception-log entry of the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExceptionEntry {
    /// When it happened.
    pub at: Timestamp,
    /// How bad it is.
    pub severity: Severity,
    /// Which part of the agent, e.g. `collector`.
    pub component: Name,
    /// What happened.
    pub message: Text,
}

/// `exception_log`: the agent's exception logs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentExceptionLog {
    /// The entries, oldest first.
    pub entries: BoundedVec<ExceptionEntry, MAX_LOG_ENTRIES>,
}

// ---- device --------------------------------------------------------------------------------

/// Device information (read-only facts).
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct DeviceInfo {
    /// Serial number (`SNO?`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<Name>,
    /// Model name (`PJINFO?`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Name>,
    /// Firmware version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_version: Option<Name>,
    /// Lens type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lens_type: Option<Name>,
    /// Temperature limit of the operating environment, °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_limit_celsius: Option<Real>,
    /// The inputs it has (`SOURCELIST?`), each with its `SOURCE` code and name: what a
    /// `source_change` order can select.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<BoundedVec<SourceRef, MAX_SOURCES>>,
}

/// Device logs (counters and dates kept by the projector).
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct DeviceLogs {
    /// First power-on of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_power_on_at: Option<Timestamp>,
    /// Last lamp replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lamp_replaced_at: Option<Timestamp>,
    /// Number of errors recorded by the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_count: Option<u32>,
    /// Number of warnings recorded by the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning_count: Option<u32>,
    /// Last light-source calibration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_light_calibration_at: Option<Timestamp>,
}

/// Power state, from `PWR?` (or derived from IMEVENT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// `00`: standby, network off.
    StandbyNetworkOff,
    /// `01`: light on.
    On,
    /// `02`: warming up.
    WarmUp,
    /// `03`: cooling down.
    CoolDown,
    /// `04`: standby, network on.
    StandbyNetworkOn,
    /// `05`: abnormal standby.
    AbnormalStandby,
    /// `09`: A/V standby.
    AvStandby,
    /// Any other code (see `power_code`).
    Other,
}

impl PowerState {
    /// The state a `PWR?` code means.
    pub fn from_code(code: u8) -> PowerState {
        match code {
            0x00 => PowerState::StandbyNetworkOff,
            0x01 => PowerState::On,
            0x02 => PowerState::WarmUp,
            0x03 => PowerState::CoolDown,
            0x04 => PowerState::StandbyNetworkOn,
            0x05 => PowerState::AbnormalStandby,
            0x09 => PowerState::AvStandby,
            _ => PowerState::Other,
        }
    }
}

/// An input source: the projector's code and, where known, its name from `SOURCELIST?`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SourceRef {
    /// `SOURCE` code, e.g. `30`.
    pub code: HexCode,
    /// Name, e.g. `HDMI1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
}

/// For people: `HDMI1 (30)`, or `30` without a name.
impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n} ({:02X})", self.code.get()),
            None => write!(f, "{:02X}", self.code.get()),
        }
    }
}

/// Input signal state (`SIGNAL?`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SignalState {
    /// No signal.
    None,
    /// A signal is present.
    Present,
    /// The signal is not supported.
    Unsupported,
}

/// A reading from one of several sensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SensorReading {
    /// Sensor name, e.g. `intake`, `exhaust`, `fan1`.
    pub sensor: Name,
    /// The value, in the unit of the field holding the list.
    pub value: Real,
}

/// Warning names (IMEVENT/PWSTATUS warning bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Warning {
    /// Lamp life.
    LampLife,
    /// No signal.
    NoSignal,
    /// Unsupported signal.
    UnsupportedSignal,
    /// Air filter.
    AirFilter,
    /// High temperature.
    HighTemperature,
    /// Aspect change.
    AspectChange,
}

/// Alarm names (IMEVENT/PWSTATUS alarm bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Alarm {
    /// Lamp did not light.
    LampOnFailure,
    /// Lamp lid open.
    LampLid,
    /// Lamp burnt out.
    LampBurnout,
    /// Fan.
    Fan,
    /// Temperature sensor.
    TemperatureSensor,
    /// High temperature.
    HighTemperature,
    /// Interior (system) error.
    Interior,
}

/// Device status.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct DeviceStatus {
    /// Power state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<PowerState>,
    /// The raw `PWR?` code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_code: Option<HexCode>,
    /// Selected input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceRef>,
    /// A/V mute on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub av_mute: Option<bool>,
    /// Input signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalState>,
    /// Light-up time per light source (`LAMP?`), hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub light_up_time_hours: Option<BoundedVec<u32, 8>>,
    /// Total operation time (`ONTIME?`), hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_operation_time_hours: Option<u32>,
    /// Remaining time of constant-luminance mode, hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luminance_constant_remaining_hours: Option<u32>,
    /// Temperatures, °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperatures_celsius: Option<BoundedVec<SensorReading, MAX_SENSORS>>,
    /// Fan revolutions, rpm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_rpm: Option<BoundedVec<SensorReading, MAX_SENSORS>>,
    /// Luminance sensor value (device units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luminance_sensor: Option<Real>,
    /// Current error code (`ERR?`), `00` = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<HexCode>,
    /// Active warnings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnings: Option<BoundedVec<Warning, 16>>,
    /// Active alarms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarms: Option<BoundedVec<Alarm, 16>>,
}

impl DeviceStatus {
    /// What is wrong with the device, in words for people: its error code unless `00`, its
    /// warnings, its alarms (`ALARM …`), by their wire names; empty when nothing is.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(code) = self.error_code
            && code.get() != 0
        {
            problems.push(format!("error {:02X}", code.get()));
        }
        for w in self.warnings.iter().flat_map(|w| w.as_slice()) {
            problems.push(crate::wire_name(w));
        }
        for a in self.alarms.iter().flat_map(|a| a.as_slice()) {
            problems.push(format!("ALARM {}", crate::wire_name(a)));
        }
        problems
    }
}

/// A series of regular samples: `values[i]` was measured at `start + i × interval_seconds`;
/// `null` where no sample was taken. Compact on purpose: 30 days of hourly values are 720
/// numbers, not 720 objects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Series {
    /// Time of the first sample.
    pub start: Timestamp,
    /// Seconds between samples (at least 1).
    pub interval_seconds: u32,
    /// The samples, in the unit named by the field holding the series.
    pub values: BoundedVec<Option<Real>, MAX_SERIES_SAMPLES>,
}

/// One entry of an error or warning history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryRecord {
    /// When it was recorded.
    pub at: Timestamp,
    /// The device code (error code for errors, warning bit name for warnings).
    pub code: Name,
}

/// History kept by the projector or accumulated by the agent.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct History {
    /// Error history.
    #[serde(default)]
    pub errors: BoundedVec<HistoryRecord, MAX_HISTORY_RECORDS>,
    /// Warning history.
    #[serde(default)]
    pub warnings: BoundedVec<HistoryRecord, MAX_HISTORY_RECORDS>,
    /// Usage: minutes with the light on per interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_minutes: Option<Series>,
    /// Internal temperature, °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<Series>,
    /// AC supply voltage, V.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ac_voltage_volts: Option<Series>,
}

/// One schedule entry of the projector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleEntry {
    /// Days of the week, Monday = bit 0 … Sunday = bit 6.
    pub weekdays: u8,
    /// Local time of day, `HH:MM`.
    pub time: BoundedString<5>,
    /// What happens, e.g. `power_on`, `power_off`.
    pub action: Name,
}

/// Projector settings.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct DeviceSettings {
    /// Name set in the projector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projector_name: Option<Name>,
    /// The projector's local time, as it reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_time: Option<Name>,
    /// IP address (v4 or v6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<std::net::IpAddr>,
    /// Colour mode (`CMODE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color_mode: Option<HexCode>,
    /// Schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<BoundedVec<ScheduleEntry, 64>>,
    /// Luminance (light-source) mode (`LUMINANCE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luminance_mode: Option<HexCode>,
    /// Constant-luminance level (`LUMLEVEL`), 0-255.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luminance_constant_level: Option<u8>,
    /// Volume (`VOL`), raw 0-255.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<u8>,
}

/// `snapshot`: the status of one device at one time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceSnapshot {
    /// The device.
    pub device_id: DeviceId,
    /// When the status was read.
    pub observed_at: Timestamp,
    /// The status.
    pub status: DeviceStatus,
}

/// `collection`: everything the agent collects about one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FullCollection {
    /// The device.
    pub device_id: DeviceId,
    /// When the collection finished.
    pub collected_at: Timestamp,
    /// Settings held in the agent for this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_settings: Option<AgentDeviceSettings>,
    /// Device information.
    pub info: DeviceInfo,
    /// Device logs.
    pub logs: DeviceLogs,
    /// Status.
    pub status: DeviceStatus,
    /// History.
    pub history: History,
    /// Settings.
    pub settings: DeviceSettings,
}

/// What happened to a device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceEventKind {
    /// An IMEVENT status change.
    StatusChange {
        /// New power state.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        power: Option<PowerState>,
        /// Warnings now active.
        warnings: BoundedVec<Warning, 16>,
        /// Alarms now active.
        alarms: BoundedVec<Alarm, 16>,
    },
    /// A warning appeared.
    Warning {
        /// Which.
        warning: Warning,
    },
    /// An alarm appeared.
    Alarm {
        /// Which.
        alarm: Alarm,
    },
    /// The device answers again.
    Reachable,
    /// The device stopped answering.
    Unreachable {
        /// Why, as seen by the agent.
        reason: Text,
    },
}

/// `event`: a status-change notification.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceEvent {
    /// The device.
    pub device_id: DeviceId,
    /// When the agent saw it.
    pub at: Timestamp,
    /// What happened.
    pub event: DeviceEventKind,
}
