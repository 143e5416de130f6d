//! UDP HELLO discovery (feature `tokio`).
//!
//! Sends the 16-byte HELLO to each configured address (and, if asked, to a broadcast
//! address) on UDP 3629 and collects the projectors' replies: name, IM type and command type.
//! Only the configured targets are contacted. HELLO is repeated a bounded number of times
//! because UDP may drop it; replies are de-duplicated by source address. The own broadcast
//! echo (status 0x00) and anything that is not an OK HELLO reply are ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::net::{HelloInfo, MAX_MESSAGE_LEN, Message};

/// Discovery settings.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// Addresses to send HELLO to (unicast or broadcast, usually port 3629).
    pub targets: Vec<SocketAddr>,
    /// Local address to bind. Port 0 picks a free port; some projectors answer to port 3629
    /// whatever the source port, so binding `0.0.0.0:3629` catches those too.
    pub bind: SocketAddr,
    /// Enables `SO_BROADCAST` (needed when a target is a broadcast address).
    pub broadcast: bool,
    /// Total time to wait for replies.
    pub timeout: Duration,
    /// How many times HELLO is sent to each target, spread over the timeout.
    pub attempts: u32,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            targets: Vec::new(),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            broadcast: false,
            timeout: Duration::from_secs(2),
            attempts: 3,
        }
    }
}

/// A projector that answered HELLO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    /// Where the reply came from.
    pub addr: SocketAddr,
    /// What it said about itself.
    pub info: HelloInfo,
}

/// Sends HELLO to every target and returns the projectors that answered, sorted by address.
pub async fn discover(config: &DiscoveryConfig) -> std::io::Result<Vec<Discovered>> {
    let socket = UdpSocket::bind(config.bind).await?;
    if config.broadcast {
        socket.set_broadcast(true)?;
    }
    let hello = Message::hello().to_bytes();
    let attempts = config.attempts.max(1);
    let interval = config.timeout / attempts;
    let end = Instant::now() + config.timeout;
    let mut found: BTreeMap<SocketAddr, HelloInfo> = BTreeMap::new();
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    for attempt in 0..attempts {
        for target in &config.targets {
            // A target that cannot be reached right now (e.g. no route) is not fatal.
            if let Err(e) = socket.send_to(&hello, target).await {
                tracing::debug!(%target, error = %e, "HELLO not sent");
            }
        }
        let round_end = if attempt + 1 == attempts {
            end
        } else {
            (Instant::now() + interval).min(end)
        };
        loop {
            let received = tokio::time::timeout_at(round_end, socket.recv_from(&mut buf)).await;
            let Ok(received) = received else { break };
            let (n, from) = match received {
                Ok(r) => r,
                // ICMP port-unreachable from an earlier send shows up here on some systems.
                Err(e) => {
                    tracing::debug!(error = %e, "receive error ignored");
                    continue;
                }
            };
            let Ok((_, msg)) = Message::decode(&buf[..n]) else {
                tracing::debug!(%from, "non-ESC/VP.net datagram ignored");
                continue;
            };
            if let Some(info) = HelloInfo::from_reply(&msg) {
                found.entry(from).or_insert(info);
            }
        }
        if config
            .targets
            .iter()
            .all(|t| !t.ip().is_unspecified() && found.contains_key(t))
            && !config.broadcast
        {
            break;
        }
    }
    Ok(found
        .into_iter()
        .map(|(addr, info)| Discovered { addr, info })
        .collect())
}
