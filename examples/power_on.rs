//! Connects to a projector and powers it on, waiting for warm-up (the `PWR ON` colon comes
//! after it).
//!
//! `cargo run -p epmc-examples --example power_on` uses an emulated projector with a 2 s
//! warm-up; `… --example power_on -- 192.168.1.20 --password PW` switches on a real one
//! (warm-up takes up to 100 s).

use std::time::{Duration, Instant};

use epmc_examples::ProjectorArgs;
use escvp::client::Client;
use escvp::emulator::{Fleet, ProjectorConfig};
use escvp::value::{Lamp, Power, PowerCommand};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = ProjectorArgs::from_env();
    let mut _fleet = None;
    let addr = match args.resolve().await?.first() {
        Some(a) => *a,
        None => {
            let config = ProjectorConfig {
                warm_up: Duration::from_secs(2),
                ..ProjectorConfig::default()
            };
            let fleet = Fleet::spawn([("127.0.0.1:0".parse()?, config)]).await?;
            let addr = fleet.projectors()[0].tcp_addr();
            _fleet = Some(fleet);
            addr
        }
    };

    let client = Client::connect(addr, args.client_config()?).await?;
    println!("power before: {:?}", client.get::<Power>().await?);
    let started = Instant::now();
    client.power(PowerCommand::On).await?;
    println!("PWR ON acknowledged after {:.1?}", started.elapsed());
    println!("power after:  {:?}", client.get::<Power>().await?);
    println!("lamp hours:   {:?}", client.get::<Lamp>().await?.hours());
    Ok(())
}
