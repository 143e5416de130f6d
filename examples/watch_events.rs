//! Watches IMEVENT status-change notifications while a projector warms up, runs, raises an
//! alarm and cools down: `cargo run -p epmc-examples --example watch_events`.

use std::time::Duration;

use escvp::client::{Client, ClientConfig, ClientEvent};
use escvp::emulator::{Fleet, ProjectorConfig};
use escvp::event::Alarms;
use escvp::value::PowerCommand;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = ProjectorConfig {
        warm_up: Duration::from_millis(500),
        cool_down: Duration::from_millis(500),
        ..ProjectorConfig::default()
    };
    let fleet = Fleet::spawn([("127.0.0.1:0".parse()?, config)]).await?;
    let projector = fleet.projectors()[0].clone();
    let client = Client::connect(projector.tcp_addr(), ClientConfig::default()).await?;
    let mut events = client.events();

    let watcher = tokio::spawn(async move {
        let mut seen = 0;
        while let Some(event) = events.recv().await {
            match event {
                ClientEvent::Status(s) => {
                    println!(
                        "IMEVENT status={:?} warnings={:?} alarms={:?}",
                        s.status, s.warnings, s.alarms
                    );
                    seen += 1;
                    if seen == 5 {
                        break;
                    }
                }
                other => println!("{other:?}"),
            }
        }
    });
    client.power(PowerCommand::On).await?; // warm-up, then on
    projector.set_alarms(Alarms::FAN); // an alarm
    projector.set_alarms(Alarms::NONE); // cleared
    client.power(PowerCommand::Off).await?; // cool-down
    tokio::time::timeout(Duration::from_secs(5), watcher).await??;
    Ok(())
}
