//! Realistic sample messages, with fixed ids and times: the committed examples in
//! `schema/examples/`, the tests' fixtures, and the benchmarks' inputs. Third-party
//! implementers can use them as known answers.

use uuid::Uuid;

use crate::bounded::{BoundedString, BoundedVec, HexCode, Real, Timestamp};
use crate::model::*;
use crate::order::*;
use crate::{Envelope, Kind, Message};

/// A bounded string from a literal known to fit.
fn s<const N: usize>(text: &str) -> BoundedString<N> {
    BoundedString::new(text).unwrap_or_default()
}

/// A finite number from a literal.
fn real(v: f32) -> Real {
    Real::new(v).unwrap_or_default()
}

/// A fixed time (2026-11-18T11:06:40Z) plus `offset` seconds.
fn ts(offset: i64) -> Timestamp {
    Timestamp::from_unix(1_795_000_000 + offset).unwrap_or_else(|_| Timestamp::now())
}

/// Hourly samples ending at the fixed time.
fn series(samples: usize, f: impl Fn(usize) -> Option<f32>) -> Series {
    Series {
        start: ts(-(samples as i64) * 3600),
        interval_seconds: 3600,
        values: BoundedVec::new((0..samples).map(|i| f(i).map(real)).collect()).unwrap_or_default(),
    }
}

/// A device that is on, showing HDMI1, with two light sources and an air-filter warning.
pub fn status() -> DeviceStatus {
    DeviceStatus {
        power: Some(PowerState::On),
        power_code: Some(HexCode::new(1)),
        source: Some(SourceRef {
            code: HexCode::new(0x30),
            name: Some(s("HDMI1")),
        }),
        av_mute: Some(false),
        signal: Some(SignalState::Present),
        light_up_time_hours: Some(BoundedVec::new(vec![1633, 1633]).unwrap_or_default()),
        total_operation_time_hours: Some(5210),
        luminance_constant_remaining_hours: Some(18000),
        temperatures_celsius: Some(
            BoundedVec::new(vec![
                SensorReading {
                    sensor: s("intake"),
                    value: real(24.5),
                },
                SensorReading {
                    sensor: s("exhaust"),
                    value: real(41.0),
                },
            ])
            .unwrap_or_default(),
        ),
        fan_rpm: Some(
            BoundedVec::new(vec![SensorReading {
                sensor: s("fan1"),
                value: real(2100.0),
            }])
            .unwrap_or_default(),
        ),
        luminance_sensor: Some(real(812.0)),
        error_code: Some(HexCode::new(0)),
        warnings: Some(BoundedVec::new(vec![Warning::AirFilter]).unwrap_or_default()),
        alarms: Some(BoundedVec::empty()),
    }
}

/// A full collection with `days` days of hourly history in every series.
pub fn collection(days: usize) -> FullCollection {
    let hours = days * 24;
    FullCollection {
        device_id: s("X8JK0000001"),
        collected_at: ts(0),
        agent_settings: Some(AgentDeviceSettings {
            device_id: s("X8JK0000001"),
            display_name: Some(s("Room 2.14 ceiling")),
            group_name: Some(s("Building B / floor 2")),
            comment: Some(s("Replaced filter 2026-10")),
        }),
        info: DeviceInfo {
            serial_number: Some(s("X8JK0000001")),
            model: Some(s("EB-PU2220B")),
            firmware_version: Some(s("1.07")),
            lens_type: Some(s("ELPLM15")),
            temperature_limit_celsius: Some(real(45.0)),
            sources: Some(
                BoundedVec::new(vec![
                    SourceRef {
                        code: HexCode::new(0x30),
                        name: Some(s("HDMI1")),
                    },
                    SourceRef {
                        code: HexCode::new(0xA0),
                        name: Some(s("HDMI2")),
                    },
                    SourceRef {
                        code: HexCode::new(0x53),
                        name: Some(s("LAN")),
                    },
                ])
                .expect("sources"),
            ),
        },
        logs: DeviceLogs {
            initial_power_on_at: Some(ts(-200 * 86400)),
            lamp_replaced_at: None,
            error_count: Some(3),
            warning_count: Some(11),
            last_light_calibration_at: Some(ts(-30 * 86400)),
        },
        status: status(),
        history: History {
            errors: BoundedVec::new(
                (0..5)
                    .map(|i| HistoryRecord {
                        at: ts(-(i as i64) * 86400),
                        code: s("04"),
                    })
                    .collect(),
            )
            .unwrap_or_default(),
            warnings: BoundedVec::new(
                (0..20)
                    .map(|i| HistoryRecord {
                        at: ts(-(i as i64) * 7200),
                        code: s("air_filter"),
                    })
                    .collect(),
            )
            .unwrap_or_default(),
            usage_minutes: Some(series(hours, |i| Some(((i * 7) % 61) as f32))),
            temperature_celsius: Some(series(hours, |i| {
                (i % 50 != 0).then(|| 30.0 + ((i * 13) % 97) as f32 / 10.0)
            })),
            ac_voltage_volts: Some(series(hours, |i| {
                Some(228.0 + ((i * 3) % 40) as f32 / 10.0)
            })),
        },
        settings: DeviceSettings {
            projector_name: Some(s("EBAF67AA")),
            local_time: Some(s("2026-11-24 13:20")),
            ip_address: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 41))),
            color_mode: Some(HexCode::new(0x04)),
            schedule: Some(
                BoundedVec::new(vec![ScheduleEntry {
                    weekdays: 0b0011111,
                    time: s("07:30"),
                    action: s("power_on"),
                }])
                .unwrap_or_default(),
            ),
            luminance_mode: Some(HexCode::new(0)),
            luminance_constant_level: Some(200),
            volume: Some(120),
        },
    }
}

/// A realistic message of each kind, with fixed ids and times (the committed examples).
pub fn sample(kind: Kind) -> Envelope {
    let message = match kind {
        Kind::Hello => Message::Hello(AgentHello {
            agent_code: s("epmc-agent"),
            version: s("0.1.0"),
            agent_id: Uuid::from_u128(0x6f1c_2d3e_4a5b_4c6d_8e9f_0a1b_2c3d_4e5f),
            connected_device_count: 2,
            locale: Some(s("de_DE")),
            language: Some(s("de")),
            devices: BoundedVec::new(vec![AgentDeviceSettings {
                device_id: s("X8JK0000001"),
                display_name: Some(s("Aula")),
                group_name: None,
                comment: None,
            }])
            .unwrap_or_default(),
        }),
        Kind::Snapshot => Message::Snapshot(DeviceSnapshot {
            device_id: s("X8JK0000001"),
            observed_at: ts(0),
            status: status(),
        }),
        Kind::Collection => Message::Collection(Box::new(collection(2))),
        Kind::Event => Message::Event(DeviceEvent {
            device_id: s("X8JK0000001"),
            at: ts(0),
            event: DeviceEventKind::StatusChange {
                power: Some(PowerState::WarmUp),
                warnings: BoundedVec::new(vec![Warning::NoSignal]).unwrap_or_default(),
                alarms: BoundedVec::empty(),
            },
        }),
        Kind::ExceptionLog => Message::ExceptionLog(AgentExceptionLog {
            entries: BoundedVec::new(vec![ExceptionEntry {
                at: ts(0),
                severity: Severity::Warning,
                component: s("collector"),
                message: s("192.0.2.44:3629 refused CONNECT: password required (0x41)"),
            }])
            .unwrap_or_default(),
        }),
        Kind::Order => Message::Order(Order {
            order_id: Uuid::from_u128(0x0c6b_9d10_4f0e_4a8e_9a4e_6b2d_8f0f_1a22),
            device_id: Some(s("X8JK0000001")),
            action: OrderAction::SourceChange {
                source: HexCode::new(0xA0),
            },
            issued_by: s("user:42"),
            expires_at: Some(ts(300)),
        }),
        Kind::OrderResult => Message::OrderResult(OrderResult {
            order_id: Uuid::from_u128(0x0c6b_9d10_4f0e_4a8e_9a4e_6b2d_8f0f_1a22),
            at: ts(5),
            outcome: OrderOutcome::Failed {
                reason: FailureReason::DeviceRefused,
                detail: Some(s("SOURCE A0 refused in standby")),
            },
            device_reply: Some(s("ERR")),
        }),
    };
    Envelope {
        schema: 1,
        id: Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef),
        sent_at: ts(1),
        message,
    }
}
