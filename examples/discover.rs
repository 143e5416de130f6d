//! Discovers projectors with UDP HELLO. Starts three emulated projectors on loopback first,
//! so it runs anywhere: `cargo run -p epmc-examples --example discover`.

use std::time::Duration;

use escvp::discovery::{DiscoveryConfig, discover};
use escvp::emulator::{Fleet, ProjectorConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fleet =
        Fleet::spawn_consecutive("127.0.0.1:0".parse()?, 3, ProjectorConfig::default()).await?;
    let config = DiscoveryConfig {
        targets: fleet.projectors().iter().map(|p| p.udp_addr()).collect(),
        bind: "127.0.0.1:0".parse()?,
        timeout: Duration::from_secs(1),
        ..DiscoveryConfig::default()
    };
    for found in discover(&config).await? {
        println!(
            "{}  name={:?} im_type={:?} command_type={:?}",
            found.addr, found.info.name, found.info.im_type, found.info.command_type
        );
    }
    Ok(())
}
