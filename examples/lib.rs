//! Examples only: see the `[[example]]` targets of this package and `README.md` beside it.
//!
//! [`ProjectorArgs`] is the command line every projector example shares: optional projector
//! addresses and a password. With no address, an example starts emulated projectors on
//! loopback, as before; with one, it talks to that real projector.

use std::net::{IpAddr, SocketAddr};

use escvp::client::ClientConfig;
use escvp::net::{DEFAULT_PORT, Password};

/// `[ADDR[:PORT]]... [--password PW]`.
#[derive(clap::Parser, Debug)]
pub struct ProjectorArgs {
    /// Projector addresses (`ADDR`, `ADDR:PORT`, `[V6]:PORT` or `HOST[:PORT]`; port 3629 by
    /// default). None: emulated projectors on 127.0.0.1.
    #[arg(value_name = "ADDR[:PORT]")]
    pub addrs: Vec<String>,
    /// The projector's ESC/VP.net password (at most 16 characters).
    #[arg(long, value_name = "PW")]
    pub password: Option<String>,
}

impl ProjectorArgs {
    /// Parses the command line (exits with a usage message on error).
    pub fn from_env() -> ProjectorArgs {
        <ProjectorArgs as clap::Parser>::parse()
    }

    /// The given addresses, resolved (port 3629 where none is given).
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error>> {
        let mut out = Vec::with_capacity(self.addrs.len());
        for a in &self.addrs {
            out.push(resolve(a).await?);
        }
        Ok(out)
    }

    /// A client configuration with the password, if one was given.
    pub fn client_config(&self) -> Result<ClientConfig, Box<dyn std::error::Error>> {
        let mut config = ClientConfig::default();
        config.session.password = self.password.as_deref().map(Password::new).transpose()?;
        Ok(config)
    }
}

/// Resolves `ADDR`, `ADDR:PORT`, `[V6]:PORT` or `HOST[:PORT]` (port 3629 by default) to the
/// first address it names.
pub async fn resolve(text: &str) -> Result<SocketAddr, Box<dyn std::error::Error>> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let with_port = if text
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        text.to_owned()
    } else {
        format!("{text}:{DEFAULT_PORT}")
    };
    tokio::net::lookup_host(&with_port)
        .await?
        .next()
        .ok_or_else(|| format!("{text}: no address").into())
}
