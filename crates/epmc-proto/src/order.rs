//! Orders (server → agent) and their results (agent → server).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bounded::{BoundedString, HexCode, Timestamp};
use crate::model::{DeviceId, Name, Text};

/// Settings an order may change: the allow-list. Anything else cannot be expressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SettingName {
    /// Projector name (1-16 printable ASCII characters).
    ProjectorName,
    /// Colour mode (`CMODE`), two hex digits.
    ColorMode,
    /// Luminance mode (`LUMINANCE`), two hex digits.
    LuminanceMode,
    /// Constant-luminance level (`LUMLEVEL`), 0-255.
    LuminanceConstantLevel,
    /// Volume (`VOL`), 0-255.
    Volume,
    /// A/V mute screen (`MSEL`), two hex digits.
    MuteScreen,
}

impl SettingName {
    /// Every setting.
    pub const ALL: [SettingName; 6] = [
        SettingName::ProjectorName,
        SettingName::ColorMode,
        SettingName::LuminanceMode,
        SettingName::LuminanceConstantLevel,
        SettingName::Volume,
        SettingName::MuteScreen,
    ];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SettingName::ProjectorName => "projector_name",
            SettingName::ColorMode => "color_mode",
            SettingName::LuminanceMode => "luminance_mode",
            SettingName::LuminanceConstantLevel => "luminance_constant_level",
            SettingName::Volume => "volume",
            SettingName::MuteScreen => "mute_screen",
        }
    }

    /// The JSON Schema `pattern` of the values [`Self::validate`] accepts (the published
    /// schema carries it, so a schema-valid order is never refused for its value).
    pub fn value_pattern(self) -> &'static str {
        match self {
            // Printable ASCII without space and colon (0x21-0x39, 0x3B-0x7E).
            SettingName::ProjectorName => "^[!-9;-~]{1,16}$",
            SettingName::ColorMode | SettingName::LuminanceMode | SettingName::MuteScreen => {
                "^[0-9A-Fa-f]{2}$"
            }
            // What `u8::from_str` accepts: an optional `+`, leading zeros, 0-255.
            SettingName::LuminanceConstantLevel | SettingName::Volume => {
                "^[+]?0*([0-9]{1,2}|1[0-9]{2}|2[0-4][0-9]|25[0-5])$"
            }
        }
    }

    /// Checks that `value` is valid for this setting.
    pub fn validate(self, value: &str) -> Result<(), &'static str> {
        let hex2 = |v: &str| v.len() == 2 && v.bytes().all(|b| b.is_ascii_hexdigit());
        let byte = |v: &str| v.parse::<u8>().is_ok();
        let ok = match self {
            SettingName::ProjectorName => {
                !value.is_empty()
                    && value.len() <= 16
                    && value.bytes().all(|b| b.is_ascii_graphic() && b != b':')
            }
            SettingName::ColorMode | SettingName::LuminanceMode | SettingName::MuteScreen => {
                hex2(value)
            }
            SettingName::LuminanceConstantLevel | SettingName::Volume => byte(value),
        };
        if ok {
            Ok(())
        } else {
            Err(match self {
                SettingName::ProjectorName => "a name of 1-16 printable ASCII characters",
                SettingName::ColorMode | SettingName::LuminanceMode | SettingName::MuteScreen => {
                    "two hex digits"
                }
                SettingName::LuminanceConstantLevel | SettingName::Volume => {
                    "an integer from 0 to 255"
                }
            })
        }
    }
}

/// What an order asks the agent to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
#[schemars(transform = setting_value_rules)]
pub enum OrderAction {
    /// Collect everything from the device now.
    CollectNow,
    /// `PWR ON`.
    PowerOn,
    /// `PWR OFF`.
    PowerOff,
    /// A/V mute on or off.
    AvMute {
        /// `true` to mute.
        on: bool,
    },
    /// Change the input.
    SourceChange {
        /// `SOURCE` code.
        source: HexCode,
    },
    /// Change a setting from the allow-list (partner-only on the server side).
    ChangeSetting {
        /// Which setting.
        name: SettingName,
        /// The new value, validated per setting on decode.
        value: BoundedString<16>,
    },
    /// Copy settings: read the copyable settings of another device of the same agent (as a
    /// named profile) and apply them to this one. One order per target device, so each gets
    /// its own result. The projector name is never copied (names stay distinct).
    CopySettings {
        /// The device whose settings are read.
        source_device: DeviceId,
        /// The profile's name, for the operator and the audit trail.
        profile: Name,
    },
    /// Check for an agent update.
    CheckAgentUpdate,
}

/// `order`: an order for one device (or, for `check_agent_update`, for the agent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Order {
    /// Identifies the order; results refer to it.
    pub order_id: Uuid,
    /// The device; absent for agent-wide orders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
    /// The action.
    #[serde(flatten)]
    pub action: OrderAction,
    /// Who issued it (a user reference for the audit trail).
    pub issued_by: Name,
    /// Do not execute after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

/// Why an order failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The projector answered `ERR` (or refused the connection).
    DeviceRefused,
    /// The projector could not be reached.
    DeviceUnreachable,
    /// No answer in time.
    TimedOut,
    /// The agent does not allow it (unknown device, expired order, invalid setting).
    NotPermitted,
}

/// The state an order reached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum OrderOutcome {
    /// Received and queued.
    Accepted,
    /// Executed successfully.
    Done,
    /// Failed.
    Failed {
        /// Why.
        reason: FailureReason,
        /// Details for humans.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<Text>,
    },
}

/// `order_result`: what became of an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OrderResult {
    /// The order.
    pub order_id: Uuid,
    /// When this state was reached.
    pub at: Timestamp,
    /// The state.
    #[serde(flatten)]
    pub outcome: OrderOutcome,
    /// The projector's own reply, where there was one (e.g. `ERR`, `PWR=01`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_reply: Option<BoundedString<200>>,
}

impl Order {
    /// Checks what the types cannot: the setting value fits its setting.
    pub fn validate(&self) -> Result<(), &'static str> {
        match &self.action {
            OrderAction::ChangeSetting { name, value } => name.validate(value.as_str()),
            _ => Ok(()),
        }
    }
}

/// Adds each setting's value rule to the `change_setting` variant of the [`OrderAction`]
/// schema: `if name is X then value matches X's pattern`.
fn setting_value_rules(schema: &mut schemars::Schema) {
    let Some(variants) = schema
        .get_mut("oneOf")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return;
    };
    for variant in variants {
        if variant["properties"]["action"]["const"] != "change_setting" {
            continue;
        }
        let rules: Vec<serde_json::Value> = SettingName::ALL
            .into_iter()
            .map(|name| {
                serde_json::json!({
                    "if": { "properties": { "name": { "const": name.as_str() } } },
                    "then": { "properties": { "value": { "pattern": name.value_pattern() } } }
                })
            })
            .collect();
        if let Some(object) = variant.as_object_mut() {
            object.insert("allOf".into(), rules.into());
        }
    }
}
