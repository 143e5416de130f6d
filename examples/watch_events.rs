//! Watches IMEVENT status-change notifications.
//!
//! `cargo run -p epmc-examples --example watch_events` drives an emulated projector through
//! warm-up, an alarm and cool-down; `… --example watch_events -- 192.168.1.20 --password PW`
//! holds a session to a real one and prints what it pushes for a minute (switch it on or off
//! with the remote meanwhile).

use std::time::Duration;

use epmc_examples::ProjectorArgs;
use escvp::client::{Client, ClientConfig, ClientEvent, Events};
use escvp::emulator::{Fleet, ProjectorConfig};
use escvp::event::Alarms;
use escvp::value::PowerCommand;

/// Prints status events until `count` arrived or the session ends.
async fn print_events(mut events: Events, count: usize) {
    let mut seen = 0;
    while let Some(event) = events.recv().await {
        match event {
            ClientEvent::Status(s) => {
                println!(
                    "IMEVENT status={:?} warnings={:?} alarms={:?}",
                    s.status, s.warnings, s.alarms
                );
                seen += 1;
                if seen == count {
                    break;
                }
            }
            other => println!("{other:?}"),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = ProjectorArgs::from_env();
    if let Some(addr) = args.resolve().await?.first() {
        let client = Client::connect(*addr, args.client_config()?).await?;
        println!("session open to {addr}; watching for 60 s");
        let watch = print_events(client.events(), usize::MAX);
        let _ = tokio::time::timeout(Duration::from_secs(60), watch).await;
        return Ok(());
    }

    let config = ProjectorConfig {
        warm_up: Duration::from_millis(500),
        cool_down: Duration::from_millis(500),
        ..ProjectorConfig::default()
    };
    let fleet = Fleet::spawn([("127.0.0.1:0".parse()?, config)]).await?;
    let projector = fleet.projectors()[0].clone();
    let client = Client::connect(projector.tcp_addr(), ClientConfig::default()).await?;
    let watcher = tokio::spawn(print_events(client.events(), 5));
    client.power(PowerCommand::On).await?; // warm-up, then on
    projector.set_alarms(Alarms::FAN); // an alarm
    projector.set_alarms(Alarms::NONE); // cleared
    client.power(PowerCommand::Off).await?; // cool-down
    tokio::time::timeout(Duration::from_secs(5), watcher).await??;
    Ok(())
}
