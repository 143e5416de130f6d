//! Discovers projectors with UDP HELLO (unicast to the given addresses), then reads each
//! one's serial number over an ESC/VP.net session.
//!
//! `cargo run -p epmc-examples --example discover` starts three emulated projectors on
//! loopback first, so it runs anywhere; `… --example discover -- 192.168.1.20 192.168.1.21
//! --password PW` asks real ones.

use std::time::Duration;

use epmc_examples::ProjectorArgs;
use escvp::client::Client;
use escvp::discovery::{DiscoveryConfig, discover};
use escvp::emulator::{Fleet, ProjectorConfig};
use escvp::value::SerialNumber;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = ProjectorArgs::from_env();
    let mut targets = args.resolve().await?;
    let mut _fleet = None;
    if targets.is_empty() {
        let fleet =
            Fleet::spawn_consecutive("127.0.0.1:0".parse()?, 3, ProjectorConfig::default()).await?;
        targets = fleet.projectors().iter().map(|p| p.udp_addr()).collect();
        _fleet = Some(fleet);
    }
    let config = DiscoveryConfig {
        bind: if targets.iter().all(|t| t.is_ipv6()) {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        },
        targets,
        timeout: Duration::from_secs(2),
        ..DiscoveryConfig::default()
    };
    let found = discover(&config).await?;
    for d in &found {
        // HELLO needs no password; a session does if the projector has one.
        let serial = match Client::connect(d.addr, args.client_config()?).await {
            Ok(client) => match client.get::<SerialNumber>().await {
                Ok(s) => s.as_str().to_owned(),
                Err(e) => format!("(SNO? failed: {e})"),
            },
            Err(e) => format!("(no session: {e})"),
        };
        println!(
            "{}  name={:?} im_type={:?} command_type={:?} serial={serial}",
            d.addr, d.info.name, d.info.im_type, d.info.command_type
        );
    }
    println!("{} of {} answered HELLO", found.len(), config.targets.len());
    Ok(())
}
