//! Connects to a projector and powers it on, waiting for warm-up (the `PWR ON` colon comes
//! after it). Uses an emulated projector with a 2 s warm-up:
//! `cargo run -p epmc-examples --example power_on`.

use std::time::{Duration, Instant};

use escvp::client::{Client, ClientConfig};
use escvp::emulator::{Fleet, ProjectorConfig};
use escvp::value::{Lamp, Power, PowerCommand};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = ProjectorConfig {
        warm_up: Duration::from_secs(2),
        ..ProjectorConfig::default()
    };
    let fleet = Fleet::spawn([("127.0.0.1:0".parse()?, config)]).await?;
    let addr = fleet.projectors()[0].tcp_addr();

    let client = Client::connect(addr, ClientConfig::default()).await?;
    println!("power before: {:?}", client.get::<Power>().await?);
    let started = Instant::now();
    client.power(PowerCommand::On).await?;
    println!("PWR ON acknowledged after {:.1?}", started.elapsed());
    println!("power after:  {:?}", client.get::<Power>().await?);
    println!("lamp hours:   {:?}", client.get::<Lamp>().await?.hours());
    Ok(())
}
