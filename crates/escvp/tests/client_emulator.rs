//! The async client against the emulator, on loopback: every call ends with a value or a
//! typed error within its timeout, for every fault the emulator can inject.
#![cfg(feature = "emulator")]

use std::net::SocketAddr;
use std::time::Duration;

use escvp::client::{Client, ClientConfig, ClientError, ClientEvent, QuietRegistry};
use escvp::discovery::{DiscoveryConfig, discover};
use escvp::emulator::{Faults, Fleet, ProjectorConfig, ProjectorHandle};
use escvp::event::{Alarms, ImStatus};
use escvp::net::Password;
use escvp::session::{CloseReason, CommandError, ConnectError, SessionConfig};
use escvp::value::{
    ErrorCode, Lamp, Mute, OnOff, Power, PowerCode, PowerCommand, SerialNumber, Source, SourceCode,
    SourceListProperty, Volume,
};
use escvp::vp21::Command;

const LOOPBACK: &str = "127.0.0.1:0";
/// Upper bound for any single call in these tests (the client's own deadlines are shorter).
const BOUND: Duration = Duration::from_secs(20);

fn fast() -> ProjectorConfig {
    ProjectorConfig {
        warm_up: Duration::from_millis(300),
        cool_down: Duration::from_millis(200),
        ..ProjectorConfig::default()
    }
}

/// Client deadlines scaled down so that timeout paths finish quickly (3 s → 0.3 s).
fn quick_config() -> ClientConfig {
    ClientConfig {
        session: SessionConfig {
            timeout_scale: 0.1,
            handshake_timeout: Duration::from_millis(500),
            ..SessionConfig::default()
        },
        ..ClientConfig::default()
    }
}

async fn one(config: ProjectorConfig) -> (Fleet, ProjectorHandle) {
    let fleet = Fleet::spawn([(LOOPBACK.parse::<SocketAddr>().unwrap(), config)])
        .await
        .expect("emulator starts");
    let p = fleet.projectors()[0].clone();
    (fleet, p)
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("call did not end within the bound")
}

#[tokio::test]
async fn reads_status_and_changes_settings() {
    let (_fleet, p) = one(fast()).await;
    let c = bounded(Client::connect(p.tcp_addr(), ClientConfig::default()))
        .await
        .unwrap();
    assert_eq!(
        bounded(c.get::<Power>()).await.unwrap(),
        PowerCode::STANDBY_NETWORK_ON
    );
    assert_eq!(
        bounded(c.get::<SerialNumber>()).await.unwrap().as_str(),
        p.serial()
    );
    let list = bounded(c.get::<SourceListProperty>()).await.unwrap();
    assert!(list.contains(SourceCode::HDMI2));
    // Picture commands are refused in standby.
    assert!(matches!(
        bounded(c.set::<Source>(&SourceCode::HDMI2)).await,
        Err(ClientError::Command(CommandError::Refused))
    ));
    // Power on: the colon comes after warm-up.
    bounded(c.power(PowerCommand::On)).await.unwrap();
    assert_eq!(bounded(c.get::<Power>()).await.unwrap(), PowerCode::ON);
    bounded(c.set::<Source>(&SourceCode::HDMI2)).await.unwrap();
    assert_eq!(bounded(c.get::<Source>()).await.unwrap(), SourceCode::HDMI2);
    // A source that is not in the projector's list is refused.
    assert!(matches!(
        bounded(c.set::<Source>(&SourceCode::DISPLAYPORT)).await,
        Err(ClientError::Command(CommandError::Refused))
    ));
    bounded(c.set::<Mute>(&OnOff::On)).await.unwrap();
    assert_eq!(bounded(c.get::<Mute>()).await.unwrap(), OnOff::On);
    bounded(c.set::<Volume>(&escvp::value::Number(200)))
        .await
        .unwrap();
    assert_eq!(bounded(c.get::<Volume>()).await.unwrap().0, 200);
    assert!(bounded(c.get::<Lamp>()).await.unwrap().first() >= 1200);
    // PWR OFF starts the cool-down. (That power commands during it are refused is checked in
    // `a_reconnect_waits_out_the_quiet_period_after_power_off`: this client's 10 s quiet period
    // outlasts the emulator's 0.2 s cool-down.)
    bounded(c.power(PowerCommand::Off)).await.unwrap();
    assert_eq!(p.power_code(), PowerCode::COOL_DOWN);
}

#[tokio::test]
async fn imevent_is_an_event_never_a_reply() {
    let (_fleet, p) = one(fast()).await;
    let c = bounded(Client::connect(p.tcp_addr(), ClientConfig::default()))
        .await
        .unwrap();
    let mut events = c.events();
    bounded(c.power(PowerCommand::On)).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match bounded(events.recv()).await {
            Some(ClientEvent::Status(s)) => seen.push(s.status),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, vec![ImStatus::WARM_UP, ImStatus::NORMAL]);
    // An alarm pushes an IMEVENT with the alarm bit and abnormal status.
    p.set_alarms(Alarms::FAN);
    match bounded(events.recv()).await {
        Some(ClientEvent::Status(s)) => {
            assert_eq!(s.status, ImStatus::ABNORMAL);
            assert!(s.alarms.contains(Alarms::FAN));
        }
        other => panic!("unexpected {other:?}"),
    }
    // IMEVENT injected before every reply does not disturb pairing.
    p.update_faults(|f| f.imevent_before_reply = true);
    p.set_error(ErrorCode::FAN);
    assert_eq!(
        bounded(c.get::<escvp::value::Error>()).await.unwrap(),
        ErrorCode::FAN
    );
    assert_eq!(bounded(c.get::<Power>()).await.unwrap(), PowerCode::ON);
}

#[tokio::test]
async fn handshake_refusals_are_typed() {
    let pw = Password::new("s3cret@1").unwrap();
    let (_fleet, p) = one(ProjectorConfig {
        password: Some(pw.clone()),
        ..fast()
    })
    .await;
    let err = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ClientError::Handshake(ConnectError::PasswordRequired)
    ));
    let wrong = quick_config().with_password(Password::new("nope").unwrap());
    let err = bounded(Client::connect(p.tcp_addr(), wrong))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ClientError::Handshake(ConnectError::WrongPassword)
    ));
    let c = bounded(Client::connect(
        p.tcp_addr(),
        quick_config().with_password(pw.clone()),
    ))
    .await
    .unwrap();
    // One session at a time: a second controller, with the right password, is refused with
    // 0x53.
    let err = bounded(Client::connect(
        p.tcp_addr(),
        quick_config().with_password(pw),
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(err, ClientError::Handshake(ConnectError::Busy)),
        "{err:?}"
    );
    bounded(c.ping()).await.unwrap();
}

#[tokio::test]
async fn busy_fault_and_second_session() {
    let (_fleet, p) = one(fast()).await;
    p.update_faults(|f| f.busy = true);
    let err = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Handshake(ConnectError::Busy)));
    p.update_faults(|f| f.busy = false);
    let first = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap();
    let err = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Handshake(ConnectError::Busy)));
    // The first session is unaffected; once it is gone the slot is free again.
    bounded(first.ping()).await.unwrap();
    drop(first);
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(c) = Client::connect(p.tcp_addr(), quick_config()).await {
            bounded(c.ping()).await.unwrap();
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "slot freed after the first session closed");
}

#[tokio::test]
async fn err_for_the_next_n_commands() {
    let (_fleet, p) = one(fast()).await;
    let c = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap();
    p.update_faults(|f| f.err_next = 2);
    for _ in 0..2 {
        assert!(matches!(
            bounded(c.get::<Power>()).await,
            Err(ClientError::Command(CommandError::Refused))
        ));
    }
    assert_eq!(
        bounded(c.get::<Power>()).await.unwrap(),
        PowerCode::STANDBY_NETWORK_ON
    );
}

#[tokio::test]
async fn slow_and_dribbled_replies_still_arrive() {
    let (_fleet, p) = one(fast()).await;
    let c = bounded(Client::connect(p.tcp_addr(), ClientConfig::default()))
        .await
        .unwrap();
    p.set_faults(Faults {
        reply_delay: Duration::from_millis(100),
        chunk_size: Some(1),
        chunk_pause: Duration::from_millis(5),
        ..Faults::default()
    });
    assert_eq!(
        bounded(c.get::<SerialNumber>()).await.unwrap().as_str(),
        p.serial()
    );
    assert_eq!(
        bounded(c.get::<Power>()).await.unwrap(),
        PowerCode::STANDBY_NETWORK_ON
    );
}

#[tokio::test]
async fn too_slow_reply_times_out_and_closes() {
    let (_fleet, p) = one(fast()).await;
    let c = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap();
    p.update_faults(|f| f.reply_delay = Duration::from_secs(2));
    let started = std::time::Instant::now();
    let err = bounded(c.get::<Power>()).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Command(CommandError::TimedOut(d)) if d == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "ended before the reply"
    );
    // The session closed: later calls fail with `Closed`, not with a timeout of their own.
    let later = bounded(c.get::<Power>()).await;
    assert!(matches!(later, Err(ClientError::Closed)), "{later:?}");
    assert!(!c.is_open());
}

#[tokio::test]
async fn silence_times_out() {
    let (_fleet, p) = one(fast()).await;
    let c = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap();
    p.update_faults(|f| f.silent = true);
    let err = bounded(c.execute(Command::Null)).await.unwrap_err();
    assert!(matches!(
        err,
        ClientError::Command(CommandError::TimedOut(_))
    ));
}

#[tokio::test]
async fn garbage_is_a_typed_error() {
    let (_fleet, p) = one(fast()).await;
    let c = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap();
    p.update_faults(|f| f.garbage = b"\x00\xff\x1b garbage".to_vec());
    let err = bounded(c.get::<Power>()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Command(CommandError::Closed(CloseReason::Malformed(_)))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn connection_drops_are_typed() {
    let (_fleet, p) = one(fast()).await;
    let c = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap();
    p.update_faults(|f| f.drop_after = Some(1));
    bounded(c.get::<Power>()).await.unwrap();
    let err = bounded(c.get::<Power>()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Command(CommandError::Closed(CloseReason::PeerClosed))
        ),
        "{err:?}"
    );
    // Dropped by the control handle, while idle: the event stream says so.
    p.update_faults(|f| f.drop_after = None);
    let c = bounded(Client::connect(p.tcp_addr(), quick_config()))
        .await
        .unwrap();
    let mut events = c.events();
    p.drop_connection();
    assert_eq!(
        bounded(events.recv()).await,
        Some(ClientEvent::Closed(CloseReason::PeerClosed))
    );
}

#[tokio::test]
async fn connect_to_nothing_fails_fast() {
    // Bind and drop to get a loopback port nobody listens on.
    let port = std::net::TcpListener::bind(LOOPBACK)
        .unwrap()
        .local_addr()
        .unwrap();
    let err = bounded(Client::connect(port, quick_config()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Io(_)), "{err:?}");
}

#[tokio::test]
async fn fleet_discovery_and_distinct_serials() {
    let fleet = Fleet::spawn_consecutive(LOOPBACK.parse().unwrap(), 12, fast())
        .await
        .unwrap();
    let targets: Vec<SocketAddr> = fleet.projectors().iter().map(|p| p.udp_addr()).collect();
    let found = bounded(discover(&DiscoveryConfig {
        targets: targets.clone(),
        bind: LOOPBACK.parse().unwrap(),
        timeout: Duration::from_secs(2),
        ..DiscoveryConfig::default()
    }))
    .await
    .unwrap();
    assert_eq!(found.len(), 12);
    for d in &found {
        let p = fleet
            .projectors()
            .iter()
            .find(|p| p.udp_addr() == d.addr)
            .expect("reply from a target");
        assert_eq!(d.info.name.as_deref(), Some(p.name()));
        assert_eq!(d.info.command_type, Some(0x21));
    }
    let mut serials = Vec::new();
    for p in fleet.projectors() {
        let c = bounded(Client::connect(p.tcp_addr(), quick_config()))
            .await
            .unwrap();
        serials.push(bounded(c.get::<SerialNumber>()).await.unwrap());
    }
    serials.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    serials.dedup();
    assert_eq!(serials.len(), 12);
}

/// The quiet period after `PWR OFF` (10 s, 1 s at `timeout_scale` 0.1) outlives the
/// connection: a client that reconnects during it sends nothing until it ends. Then a power
/// command during the (longer) cool-down is refused.
#[tokio::test]
async fn a_reconnect_waits_out_the_quiet_period_after_power_off() {
    let (_fleet, p) = one(ProjectorConfig {
        cool_down: Duration::from_secs(8),
        ..fast()
    })
    .await;
    let config = ClientConfig {
        quiet_periods: QuietRegistry::new(),
        ..quick_config()
    };
    let quiet = Duration::from_secs(1);
    let c = bounded(Client::connect(p.tcp_addr(), config.clone()))
        .await
        .unwrap();
    bounded(c.power(PowerCommand::On)).await.unwrap();
    let before_off = std::time::Instant::now();
    bounded(c.power(PowerCommand::Off)).await.unwrap();
    assert!(config.quiet_periods.until(p.tcp_addr()).is_some());
    drop(c);
    let seen = p.commands_seen();
    // The emulator takes one session at a time: retry while it frees the slot (bounded).
    let mut again = None;
    for _ in 0..50 {
        match bounded(Client::connect(p.tcp_addr(), config.clone())).await {
            Ok(c) => {
                again = Some(c);
                break;
            }
            Err(ClientError::Handshake(ConnectError::Busy)) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let c = again.expect("reconnected");
    assert!(
        before_off.elapsed() < quiet,
        "the test reconnected during the quiet period"
    );
    let answer = bounded(c.power(PowerCommand::On)).await;
    assert!(
        before_off.elapsed() >= quiet,
        "a command was answered {:?} after PWR OFF, within the quiet period",
        before_off.elapsed()
    );
    assert_eq!(
        p.commands_seen(),
        seen + 1,
        "one command after reconnecting"
    );
    // Power commands during cool-down are refused.
    assert_eq!(p.power_code(), PowerCode::COOL_DOWN);
    assert!(
        matches!(answer, Err(ClientError::Command(CommandError::Refused))),
        "{answer:?}"
    );
    // A client with its own registry knows nothing of it (the period is per registry).
    assert_eq!(QuietRegistry::new().until(p.tcp_addr()), None);
}

/// `PWR ON` gets its colon after warm-up; a projector that never sends it is given up on at
/// the documented 100 s, not earlier (40 and 70 s are ignition retries) and not never. Runs on
/// tokio's paused clock once connected.
#[tokio::test]
async fn power_on_without_a_colon_times_out_at_100_s() {
    let (_fleet, p) = one(ProjectorConfig {
        warm_up: Duration::from_secs(1000),
        ..fast()
    })
    .await;
    let c = bounded(Client::connect(p.tcp_addr(), ClientConfig::default()))
        .await
        .unwrap();
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(200), c.power(PowerCommand::On))
        .await
        .expect("PWR ON ended within 200 s")
        .unwrap_err();
    let elapsed = start.elapsed();
    assert!(
        matches!(err, ClientError::Command(CommandError::TimedOut(d)) if d == Duration::from_secs(100)),
        "{err:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(100) && elapsed < Duration::from_secs(101),
        "timed out after {elapsed:?}"
    );
    assert_eq!(p.power_code(), PowerCode::WARM_UP);
}
