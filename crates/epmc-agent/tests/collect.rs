//! Collection against the `escvp` emulator on 127.0.0.1: every value read equals what the
//! emulator holds; refused items are absent; every failure has its own typed outcome; nothing
//! hangs (each test runs under an outer timeout).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use epmc_agent::collect::{
    CollectError, CollectOptions, Collected, Projector, Stage, collect_once,
};
use epmc_agent::config::{Endpoint, TargetMeta};
use epmc_proto::bounded::BoundedVec;
use epmc_proto::model::{Alarm, DeviceEventKind, PowerState, SignalState as ProtoSignal, Warning};
use epmc_proto::{Envelope, Message};
use escvp::client::{Client, ClientConfig};
use escvp::emulator::{ClosedPort, Faults, Fleet, ProjectorConfig, ProjectorHandle};
use escvp::event::{Alarms, Warnings};
use escvp::net::Password;
use escvp::value::{
    ColorMode, ColorModeProperty, ErrorCode, LumLevel, Luminance, LuminanceMode, Mute, Number,
    OnOff, SignalState, Source, SourceCode, Volume,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// Outer bound of every test.
const BOUND: Duration = Duration::from_secs(20);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the test did not finish within its bound")
}

/// Timeouts scaled down so that timeout paths finish quickly (3 s per query → 0.3 s).
fn quick() -> CollectOptions {
    CollectOptions {
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_millis(500),
        command_timeout_scale: 0.1,
        deadline: Duration::from_secs(10),
    }
}

fn healthy_config() -> ProjectorConfig {
    ProjectorConfig {
        serial: "X8JK0000042".into(),
        model: "EB-L1755U".into(),
        lamp_hours: vec![1633, 1620],
        on_time_hours: 5021,
        hours_per_second: 0.0,
        start_on: true,
        ..ProjectorConfig::default()
    }
}

async fn one(config: ProjectorConfig) -> (Fleet, ProjectorHandle) {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let fleet = Fleet::spawn([(addr, config)])
        .await
        .expect("emulator starts");
    let p = fleet.projectors()[0].clone();
    (fleet, p)
}

/// The emulator frees its single session slot when it notices the previous client closed;
/// retry a bounded number of times while it still says busy.
async fn collect_when_free(
    endpoint: &Endpoint,
    options: &CollectOptions,
) -> Result<Collected, CollectError> {
    for _ in 0..100 {
        match collect_once(endpoint, options).await {
            Err(CollectError::Busy) => tokio::time::sleep(Duration::from_millis(20)).await,
            other => return other,
        }
    }
    Err(CollectError::Busy)
}

#[tokio::test]
async fn healthy_projector_is_collected_completely_and_exactly() {
    bounded(async {
        let (_fleet, p) = one(healthy_config()).await;
        // Move every setting away from the emulator's defaults, over a session of its own.
        let setup = Client::connect(p.tcp_addr(), ClientConfig::default())
            .await
            .expect("setup session");
        setup
            .set::<Source>(&SourceCode::HDMI2)
            .await
            .expect("SOURCE");
        setup.set::<Mute>(&OnOff::On).await.expect("MUTE");
        setup.set::<Volume>(&Number(200)).await.expect("VOL");
        setup
            .set::<ColorModeProperty>(&ColorMode::CINEMA)
            .await
            .expect("CMODE");
        setup
            .set::<Luminance>(&LuminanceMode::ECO)
            .await
            .expect("LUMINANCE");
        setup.set::<LumLevel>(&Number(180)).await.expect("LUMLEVEL");
        setup.close();
        p.set_error(ErrorCode::FAN);
        p.set_warnings(Warnings::LAMP_LIFE.union(Warnings::AIR_FILTER));
        p.set_signal(SignalState::NONE);

        let mut endpoint = Endpoint::new(p.tcp_addr());
        endpoint.meta = TargetMeta {
            display_name: Some("Room 101".into()),
            group: Some("Building A".into()),
            comment: Some("ceiling".into()),
        };
        let c = collect_when_free(&endpoint, &quick())
            .await
            .expect("collected");

        let col = &c.collection;
        assert_eq!(c.addr, p.tcp_addr());
        assert_eq!(col.device_id.as_str(), "X8JK0000042");
        assert_eq!(
            col.info.serial_number.as_ref().map(|s| s.as_str()),
            Some("X8JK0000042")
        );
        assert_eq!(
            col.info.model.as_ref().map(|s| s.as_str()),
            Some("EB-L1755U")
        );
        // Its inputs, as SOURCELIST? gives them: what a source_change order can select.
        let sources: Vec<(u8, Option<&str>)> = col
            .info
            .sources
            .iter()
            .flat_map(|s| s.as_slice())
            .map(|s| (s.code.get(), s.name.as_ref().map(|n| n.as_str())))
            .collect();
        assert_eq!(
            sources,
            [
                (0x30, Some("HDMI1")),
                (0xA0, Some("HDMI2")),
                (0x10, Some("Computer1")),
                (0x53, Some("LAN"))
            ]
        );
        // The emulator has no VER? nor NWPNAME?: absent, and listed.
        assert_eq!(col.info.firmware_version, None);
        assert_eq!(col.settings.projector_name, None);
        assert_eq!(c.report.unsupported, ["VER", "NWPNAME"]);
        assert!(c.report.problems.is_empty(), "{:?}", c.report.problems);

        let st = &col.status;
        assert_eq!(st.power, Some(PowerState::On));
        assert_eq!(st.power_code.map(|c| c.get()), Some(0x01));
        let source = st.source.as_ref().expect("source");
        assert_eq!(source.code.get(), 0xA0);
        assert_eq!(source.name.as_ref().map(|n| n.as_str()), Some("HDMI2"));
        assert_eq!(st.av_mute, Some(true));
        assert_eq!(st.signal, Some(ProtoSignal::None));
        assert_eq!(
            st.light_up_time_hours
                .as_ref()
                .map(|h| h.as_slice().to_vec()),
            Some(vec![1633, 1620])
        );
        assert_eq!(st.total_operation_time_hours, Some(5021));
        assert_eq!(st.error_code.map(|c| c.get()), Some(0x01));
        assert_eq!(
            st.warnings.as_ref().map(|w| w.as_slice().to_vec()),
            Some(vec![Warning::LampLife, Warning::AirFilter])
        );
        assert_eq!(
            st.alarms.as_ref().map(|a| a.as_slice().to_vec()),
            Some(vec![])
        );
        // Not exposed over ESC/VP21: absent, never zero.
        assert_eq!(st.temperatures_celsius, None);
        assert_eq!(st.fan_rpm, None);

        let set = &col.settings;
        assert_eq!(set.color_mode.map(|c| c.get()), Some(0x15));
        assert_eq!(set.luminance_mode.map(|c| c.get()), Some(0x01));
        assert_eq!(set.luminance_constant_level, Some(180));
        assert_eq!(set.volume, Some(200));
        assert_eq!(set.ip_address, Some(p.tcp_addr().ip()));

        let agent = col.agent_settings.as_ref().expect("agent settings");
        assert_eq!(agent.device_id.as_str(), "X8JK0000042");
        assert_eq!(
            agent.display_name.as_ref().map(|s| s.as_str()),
            Some("Room 101")
        );
        assert_eq!(
            agent.group_name.as_ref().map(|s| s.as_str()),
            Some("Building A")
        );
        assert_eq!(agent.comment.as_ref().map(|s| s.as_str()), Some("ceiling"));

        // The snapshot is the same status, and both survive the JSON envelope.
        assert_eq!(c.snapshot.device_id, col.device_id);
        assert_eq!(c.snapshot.status, col.status);
        for message in [
            Message::Snapshot(c.snapshot.clone()),
            Message::Collection(Box::new(col.clone())),
        ] {
            let envelope = Envelope::new(message);
            let back = Envelope::from_json(&envelope.to_json().expect("encodes")).expect("decodes");
            assert_eq!(back, envelope);
        }
    })
    .await;
}

#[tokio::test]
async fn alarms_are_reported_by_name() {
    bounded(async {
        let (_fleet, p) = one(healthy_config()).await;
        p.set_alarms(Alarms::FAN.union(Alarms::HIGH_TEMPERATURE));
        let c = collect_once(&Endpoint::new(p.tcp_addr()), &quick())
            .await
            .expect("collected");
        assert_eq!(
            c.collection
                .status
                .alarms
                .as_ref()
                .map(|a| a.as_slice().to_vec()),
            Some(vec![Alarm::Fan, Alarm::HighTemperature])
        );
        assert_eq!(
            c.collection
                .status
                .warnings
                .as_ref()
                .map(|w| w.as_slice().len()),
            Some(0)
        );
    })
    .await;
}

#[tokio::test]
async fn status_read_on_a_held_session_matches_the_emulator() {
    bounded(async {
        let (_fleet, p) = one(healthy_config()).await;
        let mut projector = Projector::connect(&Endpoint::new(p.tcp_addr()), &quick())
            .await
            .expect("session");
        let first = projector.read_status().await.expect("status");
        assert_eq!(first.snapshot.device_id.as_str(), "X8JK0000042");
        assert_eq!(first.snapshot.status.power, Some(PowerState::On));
        assert_eq!(
            first.snapshot.status.source.as_ref().map(|s| s.code.get()),
            Some(0x30)
        );
        assert_eq!(first.snapshot.status.av_mute, Some(false));
        // A change made on the projector shows in the next read of the same session.
        p.set_error(ErrorCode::LAMP);
        let second = projector.read_status().await.expect("status");
        assert_eq!(
            second.snapshot.status.error_code.map(|c| c.get()),
            Some(0x06)
        );
        assert!(second.report.unsupported.is_empty());
        projector.close().await;
    })
    .await;
}

#[tokio::test]
async fn items_refused_in_standby_are_absent_not_zero() {
    bounded(async {
        let (_fleet, p) = one(ProjectorConfig {
            start_on: false,
            ..healthy_config()
        })
        .await;
        let c = collect_once(&Endpoint::new(p.tcp_addr()), &quick())
            .await
            .expect("collected");
        let st = &c.collection.status;
        assert_eq!(st.power, Some(PowerState::StandbyNetworkOn));
        assert_eq!(st.power_code.map(|c| c.get()), Some(0x04));
        // Readable in standby.
        assert_eq!(
            st.light_up_time_hours
                .as_ref()
                .map(|h| h.as_slice().to_vec()),
            Some(vec![1633, 1620])
        );
        assert_eq!(st.total_operation_time_hours, Some(5021));
        assert_eq!(st.error_code.map(|c| c.get()), Some(0x00));
        // The emulator lists its inputs in standby too (SOURCE? is refused, SOURCELIST? is
        // asked by the full collection itself).
        assert_eq!(
            c.collection
                .info
                .sources
                .as_ref()
                .map(|s| s.as_slice().len()),
            Some(4)
        );
        // Refused in standby: absent.
        assert_eq!(st.source, None);
        assert_eq!(st.av_mute, None);
        assert_eq!(st.signal, None);
        let set = &c.collection.settings;
        assert_eq!(set.color_mode, None);
        assert_eq!(set.luminance_mode, None);
        assert_eq!(set.luminance_constant_level, None);
        assert_eq!(set.volume, None);
        assert_eq!(
            c.report.unsupported,
            [
                "VER",
                "SOURCE",
                "MUTE",
                "SIGNAL",
                "NWPNAME",
                "CMODE",
                "LUMINANCE",
                "LUMLEVEL",
                "VOL"
            ]
        );
        // The JSON leaves absent items out instead of writing zeros.
        let json = String::from_utf8(
            Envelope::new(Message::Collection(Box::new(c.collection.clone())))
                .to_json()
                .expect("encodes"),
        )
        .expect("utf-8");
        for key in ["\"volume\"", "\"source\"", "\"av_mute\"", "\"color_mode\""] {
            assert!(!json.contains(key), "{key} present in {json}");
        }
    })
    .await;
}

#[tokio::test]
async fn unsupported_serial_falls_back_to_the_address_as_device_id() {
    bounded(async {
        let (_fleet, p) = one(ProjectorConfig {
            faults: Faults {
                err_next: 1, // the first command, SNO?, gets ERR
                ..Faults::default()
            },
            ..healthy_config()
        })
        .await;
        let c = collect_once(&Endpoint::new(p.tcp_addr()), &quick())
            .await
            .expect("collected");
        assert_eq!(c.collection.device_id.as_str(), "ip:127.0.0.1");
        assert_eq!(c.snapshot.device_id.as_str(), "ip:127.0.0.1");
        assert_eq!(c.collection.info.serial_number, None);
        assert_eq!(c.report.unsupported.first(), Some(&"SNO"));
        // Everything after it is read normally.
        assert_eq!(
            c.collection.info.model.as_ref().map(|m| m.as_str()),
            Some("EB-L1755U")
        );
        assert_eq!(c.collection.status.power, Some(PowerState::On));
    })
    .await;
}

#[tokio::test]
async fn busy_projector_is_busy_whether_faulted_or_held_by_another_controller() {
    bounded(async {
        let (_fleet, p) = one(healthy_config()).await;
        p.update_faults(|f| f.busy = true);
        let endpoint = Endpoint::new(p.tcp_addr());
        assert_eq!(
            collect_once(&endpoint, &quick()).await.unwrap_err(),
            CollectError::Busy
        );
        p.update_faults(|f| f.busy = false);
        let other = Client::connect(p.tcp_addr(), ClientConfig::default())
            .await
            .expect("another controller's session");
        let err = collect_once(&endpoint, &quick()).await.unwrap_err();
        assert_eq!(err, CollectError::Busy);
        assert_eq!(err.code(), "busy");
        assert!(err.is_escvp_refusal());
        other.close();
        // Once the other controller is gone, the projector can be read.
        let c = collect_when_free(&endpoint, &quick())
            .await
            .expect("collected");
        assert_eq!(c.collection.device_id.as_str(), "X8JK0000042");
    })
    .await;
}

#[tokio::test]
async fn password_missing_wrong_and_right() {
    bounded(async {
        let (_fleet, p) = one(ProjectorConfig {
            password: Some(Password::new("s3cret").expect("password")),
            ..healthy_config()
        })
        .await;
        let none = Endpoint::new(p.tcp_addr());
        assert_eq!(
            collect_once(&none, &quick()).await.unwrap_err(),
            CollectError::PasswordRequired
        );
        let wrong = none
            .clone()
            .with_password(Some(Password::new("guess").expect("password")));
        assert_eq!(
            collect_once(&wrong, &quick()).await.unwrap_err(),
            CollectError::WrongPassword
        );
        let right = none
            .clone()
            .with_password(Some(Password::new("s3cret").expect("password")));
        let c = collect_when_free(&right, &quick())
            .await
            .expect("collected");
        assert_eq!(c.collection.device_id.as_str(), "X8JK0000042");
        assert_eq!(c.collection.status.power, Some(PowerState::On));
    })
    .await;
}

#[tokio::test]
async fn slow_projector_times_out_within_the_bound() {
    bounded(async {
        let (_fleet, p) = one(ProjectorConfig {
            faults: Faults {
                reply_delay: Duration::from_secs(3),
                ..Faults::default()
            },
            ..healthy_config()
        })
        .await;
        let started = tokio::time::Instant::now();
        let err = collect_once(&Endpoint::new(p.tcp_addr()), &quick())
            .await
            .unwrap_err();
        assert_eq!(err, CollectError::TimedOut(Stage::Command("SNO")));
        // 0.3 s command deadline, far from the emulator's 3 s delay.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn whole_collection_deadline_bounds_a_projector_that_answers_slowly() {
    bounded(async {
        let (_fleet, p) = one(ProjectorConfig {
            faults: Faults {
                reply_delay: Duration::from_millis(150),
                ..Faults::default()
            },
            ..healthy_config()
        })
        .await;
        // Each answer comes within the 3 s command deadline, but 20 of them do not fit in 1 s.
        let options = CollectOptions {
            command_timeout_scale: 1.0,
            deadline: Duration::from_secs(1),
            ..quick()
        };
        let started = tokio::time::Instant::now();
        let err = collect_once(&Endpoint::new(p.tcp_addr()), &options)
            .await
            .unwrap_err();
        assert_eq!(err, CollectError::TimedOut(Stage::Deadline));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn silent_peer_times_out_in_the_handshake() {
    bounded(async {
        // Accepts connections and never says anything.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let err = collect_once(&Endpoint::new(addr), &quick())
            .await
            .unwrap_err();
        assert_eq!(err, CollectError::TimedOut(Stage::Handshake));
        assert_eq!(err.code(), "timeout");
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn garbage_after_the_handshake_is_garbage() {
    bounded(async {
        let (_fleet, p) = one(ProjectorConfig {
            faults: Faults {
                garbage: b"\xff\xfe\x00noise".to_vec(),
                ..Faults::default()
            },
            ..healthy_config()
        })
        .await;
        let err = collect_once(&Endpoint::new(p.tcp_addr()), &quick())
            .await
            .unwrap_err();
        assert!(matches!(err, CollectError::Garbage(_)), "{err:?}");
        assert_eq!(err.code(), "garbage");
        assert!(!err.is_escvp_refusal());
    })
    .await;
}

#[tokio::test]
async fn a_web_server_on_the_port_is_garbage() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
                // Keep the connection open: the verdict must come from the bytes.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    drop(s);
                });
            }
        });
        let err = collect_once(&Endpoint::new(addr), &quick())
            .await
            .unwrap_err();
        assert!(matches!(err, CollectError::Garbage(_)), "{err:?}");
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn dropped_connection_is_dropped() {
    bounded(async {
        for answered in [0, 4] {
            let (_fleet, p) = one(ProjectorConfig {
                faults: Faults {
                    drop_after: Some(answered),
                    ..Faults::default()
                },
                ..healthy_config()
            })
            .await;
            let err = collect_once(&Endpoint::new(p.tcp_addr()), &quick())
                .await
                .unwrap_err();
            assert_eq!(err, CollectError::Dropped, "after {answered} answers");
            assert_eq!(err.code(), "dropped");
        }
    })
    .await;
}

#[tokio::test]
async fn closed_port_is_refused() {
    bounded(async {
        let closed = ClosedPort::on([127, 0, 0, 1].into()).expect("reserve a port");
        let err = collect_once(&Endpoint::new(closed.addr()), &quick())
            .await
            .unwrap_err();
        assert_eq!(err, CollectError::Refused);
        assert_eq!(err.code(), "refused");
    })
    .await;
}

#[tokio::test]
async fn imevent_before_every_reply_does_not_disturb_the_values() {
    bounded(async {
        let (_fleet, p) = one(ProjectorConfig {
            faults: Faults {
                imevent_before_reply: true,
                chunk_size: Some(3),
                ..Faults::default()
            },
            ..healthy_config()
        })
        .await;
        let c = collect_once(&Endpoint::new(p.tcp_addr()), &quick())
            .await
            .expect("collected");
        assert_eq!(c.collection.device_id.as_str(), "X8JK0000042");
        assert_eq!(c.collection.status.total_operation_time_hours, Some(5021));
        assert_eq!(c.collection.settings.volume, Some(120));
        assert_eq!(c.report.unsupported, ["VER", "NWPNAME"]);
    })
    .await;
}

#[tokio::test]
async fn held_session_turns_imevents_into_event_messages() {
    bounded(async {
        let (_fleet, p) = one(healthy_config()).await;
        let mut projector = Projector::connect(&Endpoint::new(p.tcp_addr()), &quick())
            .await
            .expect("session");
        let mut report = epmc_agent::collect::Report::default();
        projector.identify(&mut report).await.expect("serial");
        let mut notes = projector.notifications();

        p.set_warnings(Warnings::AIR_FILTER);
        let e = notes.next().await.expect("an event");
        assert_eq!(e.device_id.as_str(), "X8JK0000042");
        assert_eq!(
            e.event,
            DeviceEventKind::StatusChange {
                power: Some(PowerState::On),
                warnings: BoundedVec::new(vec![Warning::AirFilter]).expect("list"),
                alarms: BoundedVec::empty(),
            }
        );

        p.set_alarms(Alarms::FAN);
        let e = notes.next().await.expect("an event");
        assert_eq!(
            e.event,
            DeviceEventKind::StatusChange {
                power: None, // abnormal: no power state
                warnings: BoundedVec::new(vec![Warning::AirFilter]).expect("list"),
                alarms: BoundedVec::new(vec![Alarm::Fan]).expect("list"),
            }
        );

        // The session ends: the notifications end too, instead of waiting forever.
        p.drop_connection();
        assert_eq!(notes.next().await, None);
        projector.close().await;
    })
    .await;
}
