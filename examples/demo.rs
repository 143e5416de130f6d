//! The `escvp` crate on its own, as an integrator embeds it: a fleet of emulated projectors on
//! loopback, discovered with UDP HELLO and read through the `escvp` client. (The whole system,
//! server, agent and projectors, is `scripts/demo`.)
//!
//! `demo ADDR... [--password PW]` reads real projectors instead (read only: it does not
//! switch them on).

use std::time::Duration;

use epmc_examples::ProjectorArgs;
use escvp::client::{Client, ClientConfig, ClientEvent};
use escvp::discovery::{DiscoveryConfig, discover};
use escvp::emulator::{Fleet, ProjectorConfig};
use escvp::value::{Lamp, OnTime, Power, PowerCommand, ProjectorInfo, SerialNumber};

const FLEET_SIZE: usize = 6;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = ProjectorArgs::from_env();
    let real = args.resolve().await?;
    if !real.is_empty() {
        return read_real(&args, real).await;
    }
    println!("escvp demo: the protocol crate, its async client and its projector emulator on");
    println!("their own, as an integrator embeds them (the whole system is scripts/demo).\n");

    let template = ProjectorConfig {
        warm_up: Duration::from_millis(1500),
        cool_down: Duration::from_millis(800),
        hours_per_second: 3600.0,
        ..ProjectorConfig::default()
    };
    let fleet = Fleet::spawn_consecutive("127.0.0.1:0".parse()?, FLEET_SIZE, template).await?;
    println!("Started {FLEET_SIZE} emulated projectors on 127.0.0.1 (ESC/VP.net, TCP+UDP).");

    let found = discover(&DiscoveryConfig {
        targets: fleet.projectors().iter().map(|p| p.udp_addr()).collect(),
        bind: "127.0.0.1:0".parse()?,
        timeout: Duration::from_secs(1),
        ..DiscoveryConfig::default()
    })
    .await?;
    println!(
        "UDP HELLO discovery: {} projector(s) answered.\n",
        found.len()
    );

    println!(
        "{:<18} {:<12} {:<12} {:<9} {:<20} {:>6} {:>6}",
        "address", "name", "serial", "model", "power", "lamp h", "on h"
    );
    for d in &found {
        let client = Client::connect(d.addr, ClientConfig::default()).await?;
        println!(
            "{:<18} {:<12} {:<12} {:<9} {:<20} {:>6} {:>6}",
            d.addr.to_string(),
            d.info.name.as_deref().unwrap_or("?"),
            client.get::<SerialNumber>().await?.as_str(),
            client.get::<ProjectorInfo>().await?.as_str(),
            client.get::<Power>().await?.name().unwrap_or("unknown"),
            client.get::<Lamp>().await?.first(),
            client.get::<OnTime>().await?.0,
        );
    }

    let first = &fleet.projectors()[0];
    println!(
        "\nPowering on {} ({}) and watching its IMEVENT notifications:",
        first.name(),
        first.tcp_addr()
    );
    let client = Client::connect(first.tcp_addr(), ClientConfig::default()).await?;
    let mut events = client.events();
    client.power(PowerCommand::On).await?;
    while let Ok(Some(ClientEvent::Status(s))) =
        tokio::time::timeout(Duration::from_millis(200), events.recv()).await
    {
        println!("  IMEVENT status={:?} alarms={:?}", s.status, s.alarms);
    }
    println!("  PWR? now answers {:?}", client.get::<Power>().await?);
    println!(
        "\nTry it yourself: cargo run -p escvp --features emulator --bin escvp-emulator -- --listen 127.0.0.1:0 --count 3"
    );
    fleet.shutdown().await;
    Ok(())
}

/// The table for real projectors: HELLO, then a read-only session each.
async fn read_real(
    args: &ProjectorArgs,
    targets: Vec<std::net::SocketAddr>,
) -> Result<(), Box<dyn std::error::Error>> {
    let found = discover(&DiscoveryConfig {
        bind: if targets.iter().all(|t| t.is_ipv6()) {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        },
        targets: targets.clone(),
        timeout: Duration::from_secs(2),
        ..DiscoveryConfig::default()
    })
    .await?;
    println!("UDP HELLO: {} of {} answered.", found.len(), targets.len());
    for addr in targets {
        let name = found
            .iter()
            .find(|d| d.addr == addr)
            .and_then(|d| d.info.name.clone())
            .unwrap_or_else(|| "?".into());
        match Client::connect(addr, args.client_config()?).await {
            Ok(client) => {
                let power = client.get::<Power>().await?;
                let serial = client.get::<SerialNumber>().await?;
                println!(
                    "{addr}  {name}  serial {}  power {}",
                    serial.as_str(),
                    power.name().unwrap_or("unknown")
                );
            }
            Err(e) => println!("{addr}  {name}  no session: {e}"),
        }
    }
    Ok(())
}
