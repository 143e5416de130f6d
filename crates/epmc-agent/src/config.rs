//! The agent's configuration file (TOML).
//!
//! ```toml
//! mode = "monitor-only"          # or "bidirectional" (the default): may the server send orders?
//! concurrency = 16               # projectors talked to at once (1-256)
//!
//! [schedule]
//! status_interval_seconds = 60              # 10-3600, default 60
//! full_collection_interval_seconds = 86400  # 600-604800, default 86400, >= status interval
//!
//! [server]
//! url = "mqtts://epmc.example.com:8883"
//! ca_cert = "/etc/epmc-agent/server-ca.pem"
//! client_cert = "/etc/epmc-agent/agent.pem"
//! client_key = "/etc/epmc-agent/agent.key"
//!
//! [proxy]                        # optional: the server is reached through it (HTTP CONNECT)
//! url = "http://proxy.example.com:3128"
//! username = "agent"             # optional Basic credentials (both or neither)
//! password = "proxy-pw"
//!
//! [update]                       # optional: self-update (see the update module)
//! url = "https://epmc.example.com:8443"   # the server's HTTPS address (443 by default)
//! public_key = "ed25519:…"                # printed by `epmc-server release keygen`
//! check_interval_seconds = 86400          # 3600-2592000, default 86400
//!
//! [[target]]
//! address = "192.168.10.21"      # ADDR[:PORT] (port 3629 by default)
//! password = "monitor-pw"        # ESC/VP.net password, at most 16 characters
//! display_name = "Room 101"
//! group = "Building A"
//! comment = "ceiling mount"
//! session = "hold"               # keep one session open (IMEVENT); "poll" (default): connect, work, disconnect
//! http_port = 80                 # HTTP json_query fallback where 3629 is closed (1-65535, default 80)
//!
//! [[target]]
//! address = "192.168.20.0/24"    # CIDR[:PORT], at most 65 536 addresses (an IPv4 /16)
//! ```
//!
//! Every error names its line and why ([`ConfigError`]); unknown keys are errors naming the
//! key. [`AgentConfig::endpoints`] expands the targets into the exact list of addresses the
//! agent may contact; nothing else is ever contacted.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use epmc_proto::release::{ReleaseError, ReleasePublicKey};
use epmc_transport::client::{CredentialsError, HttpProxy, ProxyCredentials};
use escvp::net::{DEFAULT_PORT, Password};
use serde::Deserialize;
use toml::Spanned;

/// The HTTP fallback port when a target names none.
pub const DEFAULT_HTTP_PORT: u16 = 80;
/// Most addresses one CIDR range may hold (an IPv4 /16 or an IPv6 /112).
pub const MAX_RANGE_ADDRESSES: u32 = 1 << 16;
/// Most addresses all targets together may expand to.
pub const MAX_TOTAL_ADDRESSES: usize = 1 << 16;
/// Bounds of `concurrency`.
pub const CONCURRENCY_RANGE: std::ops::RangeInclusive<u64> = 1..=256;
/// Default `concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Bounds of `schedule.status_interval_seconds`.
pub const STATUS_INTERVAL_RANGE: std::ops::RangeInclusive<u64> = 10..=3600;
/// Default `schedule.status_interval_seconds`.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(60);
/// Bounds of `schedule.full_collection_interval_seconds`.
pub const FULL_INTERVAL_RANGE: std::ops::RangeInclusive<u64> = 600..=604_800;
/// Default `schedule.full_collection_interval_seconds`.
pub const DEFAULT_FULL_INTERVAL: Duration = Duration::from_secs(86_400);
/// Longest display name, group name (the protocol's `Name`).
pub const MAX_NAME_LEN: usize = 64;
/// Longest comment (the protocol's `Text`).
pub const MAX_COMMENT_LEN: usize = 1000;
/// Bounds of `update.check_interval_seconds`.
pub const UPDATE_INTERVAL_RANGE: std::ops::RangeInclusive<u64> = 3600..=2_592_000;
/// Default `update.check_interval_seconds`.
pub const DEFAULT_UPDATE_INTERVAL: Duration = Duration::from_secs(86_400);

/// A configuration that could not be loaded: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when the configuration came from one.
    pub file: Option<PathBuf>,
    /// 1-based line of the offending key or value, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: {}", file.display(), self.message),
            (Some(file), None) => write!(f, "{}: {}", file.display(), self.message),
            (None, Some(line)) => write!(f, "line {line}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn at(text: &str, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: None,
            line: span.map(|s| line_of(text, s.start)),
            message: message.into(),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Whether the server may send orders to this agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Collect and report, and execute the server's orders.
    #[default]
    Bidirectional,
    /// Collect and report only; orders are refused.
    MonitorOnly,
}

/// How the agent keeps its ESC/VP.net session to a projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionMode {
    /// Keep one session open: IMEVENT notifications arrive at once, but other control
    /// systems are locked out (a projector serves one session at a time).
    Hold,
    /// Connect, work, disconnect: other control systems can reach the projector in between.
    #[default]
    Poll,
}

/// A target as written: one address or a CIDR range, with the port to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    /// One address.
    Single(SocketAddr),
    /// Every host address of a network.
    Range(CidrRange),
}

/// A validated CIDR range with a port: host bits zero, at most [`MAX_RANGE_ADDRESSES`]
/// addresses. For IPv4 ranges up to /30 the network and broadcast addresses are left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrRange {
    network: IpAddr,
    prefix: u8,
    port: u16,
}

impl CidrRange {
    /// Validates a range: the prefix fits the address family, the range holds at most
    /// [`MAX_RANGE_ADDRESSES`] addresses and `network` has no host bits set.
    pub fn new(network: IpAddr, prefix: u8, port: u16) -> Result<CidrRange, TargetError> {
        let width: u8 = if network.is_ipv4() { 32 } else { 128 };
        if prefix > width {
            return Err(TargetError::BadPrefix(prefix.to_string(), width));
        }
        if port == 0 {
            return Err(TargetError::BadPort(port.to_string()));
        }
        let host_bits = u32::from(width - prefix);
        let count = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
        if count > u128::from(MAX_RANGE_ADDRESSES) {
            return Err(TargetError::RangeTooLarge {
                prefix,
                count,
                max: MAX_RANGE_ADDRESSES,
            });
        }
        // A range in multicast space, or starting at the unspecified address, holds no
        // projectors.
        check_unicast(network)?;
        let bits = ip_bits(network);
        let base = bits & !(count - 1);
        if base != bits {
            return Err(TargetError::HostBitsSet {
                given: network,
                network: ip_from_bits(network, base),
                prefix,
            });
        }
        Ok(CidrRange {
            network,
            prefix,
            port,
        })
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn skips_edges(&self) -> bool {
        self.network.is_ipv4() && self.prefix <= 30
    }

    /// How many addresses the range yields (at most [`MAX_RANGE_ADDRESSES`]).
    pub fn len(&self) -> usize {
        let width: u32 = if self.network.is_ipv4() { 32 } else { 128 };
        let count = 1usize << (width - u32::from(self.prefix));
        if self.skips_edges() { count - 2 } else { count }
    }

    /// Always false: a range names at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Why a target string is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Empty.
    #[error("the address is empty")]
    Empty,
    /// Not an IP address (host names are not accepted: the list of contacted addresses must
    /// be exact).
    #[error("{0:?} is not an IP address (host names are not accepted)")]
    NotAnAddress(String),
    /// The port is not a number from 1 to 65535.
    #[error("{0:?} is not a port number from 1 to 65535")]
    BadPort(String),
    /// The prefix length is not a number within the address family's width.
    #[error("{0:?} is not a prefix length from 0 to {1}")]
    BadPrefix(String, u8),
    /// The range holds more addresses than allowed.
    #[error(
        "the range /{prefix} holds {count} addresses; at most {max} are allowed (an IPv4 /16 or an IPv6 /112); split it or use a longer prefix"
    )]
    RangeTooLarge {
        /// Prefix length.
        prefix: u8,
        /// Addresses in the range (saturating).
        count: u128,
        /// The maximum.
        max: u32,
    },
    /// The address has bits set below the prefix.
    #[error("{given} has host bits set; the network is {network}/{prefix}")]
    HostBitsSet {
        /// As written.
        given: IpAddr,
        /// The network it belongs to.
        network: IpAddr,
        /// Prefix length.
        prefix: u8,
    },
    /// Unspecified, multicast or broadcast address.
    #[error("{0} cannot be a projector's address")]
    NotUnicast(IpAddr),
}

impl FromStr for TargetSpec {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TargetError::Empty);
        }
        // Split off the port: `[v6...]:port`, `v4...:port`, or none.
        let (body, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest
                .split_once(']')
                .ok_or_else(|| TargetError::NotAnAddress(s.to_owned()))?;
            let port = match after {
                "" => DEFAULT_PORT,
                p => parse_port(
                    p.strip_prefix(':')
                        .ok_or_else(|| TargetError::NotAnAddress(s.to_owned()))?,
                )?,
            };
            (inner, port)
        } else if s.matches(':').count() == 1 {
            let (a, p) = s.split_once(':').unwrap_or((s, ""));
            (a, parse_port(p)?)
        } else {
            (s, DEFAULT_PORT)
        };
        let (addr_text, prefix_text) = match body.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (body, None),
        };
        let ip: IpAddr = addr_text
            .parse()
            .map_err(|_| TargetError::NotAnAddress(addr_text.to_owned()))?;
        let width: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let Some(prefix_text) = prefix_text else {
            check_unicast(ip)?;
            return Ok(TargetSpec::Single(SocketAddr::new(ip, port)));
        };
        let prefix: u8 = prefix_text
            .parse()
            .ok()
            .filter(|p| *p <= width)
            .ok_or_else(|| TargetError::BadPrefix(prefix_text.to_owned(), width))?;
        let range = CidrRange::new(ip, prefix, port)?;
        if prefix == width {
            check_unicast(ip)?;
            return Ok(TargetSpec::Single(SocketAddr::new(ip, port)));
        }
        Ok(TargetSpec::Range(range))
    }
}

fn parse_port(p: &str) -> Result<u16, TargetError> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| TargetError::BadPort(p.to_owned()))
}

fn check_unicast(ip: IpAddr) -> Result<(), TargetError> {
    let bad = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if bad {
        Err(TargetError::NotUnicast(ip))
    } else {
        Ok(())
    }
}

fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn ip_from_bits(family: IpAddr, bits: u128) -> IpAddr {
    match family {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(bits as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
    }
}

impl TargetSpec {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            TargetSpec::Single(a) => a.port(),
            TargetSpec::Range(r) => r.port,
        }
    }

    /// How many addresses [`Self::addresses`] yields.
    pub fn len(&self) -> usize {
        match *self {
            TargetSpec::Single(_) => 1,
            TargetSpec::Range(r) => r.len(),
        }
    }

    /// Always false: a target names at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every address of the target, in ascending order.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let (first, count, port, family) = match *self {
            TargetSpec::Single(a) => (ip_bits(a.ip()), 1usize, a.port(), a.ip()),
            TargetSpec::Range(r) => {
                let first = ip_bits(r.network) + u128::from(r.skips_edges());
                (first, r.len(), r.port, r.network)
            }
        };
        (0..count).map(move |i| SocketAddr::new(ip_from_bits(family, first + i as u128), port))
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TargetSpec::Single(a) => write!(f, "{a}"),
            TargetSpec::Range(r) if r.network.is_ipv4() => {
                write!(f, "{}/{}:{}", r.network, r.prefix, r.port)
            }
            TargetSpec::Range(r) => write!(f, "[{}/{}]:{}", r.network, r.prefix, r.port),
        }
    }
}

impl<'de> Deserialize<'de> for TargetSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Settings the agent keeps for a device and reports with it (not stored in the projector).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetMeta {
    /// Display name.
    pub display_name: Option<String>,
    /// Group name.
    pub group: Option<String>,
    /// Comment.
    pub comment: Option<String>,
}

/// One `[[target]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Address or range, with port.
    pub spec: TargetSpec,
    /// ESC/VP.net password.
    pub password: Option<Password>,
    /// Display name, group and comment.
    pub meta: TargetMeta,
    /// Held or per-poll session.
    pub session: SessionMode,
    /// Port of the HTTP `json_query` fallback.
    pub http_port: u16,
    /// Line of its `address` in the file.
    pub line: usize,
}

/// One address the agent may contact, with what it needs to talk to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Address and port.
    pub addr: SocketAddr,
    /// ESC/VP.net password.
    pub password: Option<Password>,
    /// Held or per-poll session.
    pub session: SessionMode,
    /// Display name, group and comment.
    pub meta: TargetMeta,
    /// Port of the HTTP `json_query` fallback on the same address (`None`: no fallback).
    pub http_port: Option<u16>,
}

impl Endpoint {
    /// An endpoint with no password, per-poll sessions, no metadata and the HTTP fallback on
    /// port 80.
    pub fn new(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            password: None,
            session: SessionMode::Poll,
            meta: TargetMeta::default(),
            http_port: Some(DEFAULT_HTTP_PORT),
        }
    }

    /// Sets the HTTP fallback port (`None`: no fallback).
    pub fn with_http_port(mut self, port: Option<u16>) -> Endpoint {
        self.http_port = port;
        self
    }

    /// Sets the password.
    pub fn with_password(mut self, password: Option<Password>) -> Endpoint {
        self.password = password;
        self
    }
}

/// When the agent collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Between two status reads of one projector.
    pub status_interval: Duration,
    /// Between two full collections of one projector.
    pub full_collection_interval: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            status_interval: DEFAULT_STATUS_INTERVAL,
            full_collection_interval: DEFAULT_FULL_INTERVAL,
        }
    }
}

/// A server URL: `mqtts://HOST[:PORT]` (port 8883 by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerUrl {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// An HTTP proxy: `url = "http://HOST:PORT"` and optional `username`/`password` (Basic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Basic credentials (`username` and `password` in the `[proxy]` section).
    pub credentials: Option<ProxyCredentials>,
}

impl ProxyUrl {
    /// The proxy as the MQTT client takes it ([`epmc_transport::client::MqttOptions::proxy`]).
    pub fn to_http_proxy(&self) -> HttpProxy {
        HttpProxy::new(&self.host, self.port).with_credentials(self.credentials.clone())
    }
}

pub(crate) fn parse_url(
    text: &str,
    scheme: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), String> {
    let rest = text
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(|| format!("{text:?} must start with {scheme}://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) || rest.chars().any(char::is_whitespace) {
        return Err(format!(
            "{text:?}: only {scheme}://HOST:PORT is accepted (no path, query or credentials)"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: unclosed '['"))?;
        (h, after.strip_prefix(':'))
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    let port = match (port, default_port) {
        (Some(p), _) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{text:?}: {p:?} is not a port number from 1 to 65535"))?,
        (None, Some(d)) => d,
        (None, None) => return Err(format!("{text:?} needs a port ({scheme}://HOST:PORT)")),
    };
    Ok((host.to_owned(), port))
}

impl<'de> Deserialize<'de> for ServerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (host, port) = parse_url(&s, "mqtts", Some(8883)).map_err(serde::de::Error::custom)?;
        Ok(ServerUrl { host, port })
    }
}

/// The server's HTTPS address: `https://HOST[:PORT]` (port 443 by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsUrl {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

impl<'de> Deserialize<'de> for HttpsUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (host, port) = parse_url(&s, "https", Some(443)).map_err(serde::de::Error::custom)?;
        Ok(HttpsUrl { host, port })
    }
}

/// The `[update]` section: where to look for agent releases and the key they are signed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateConfig {
    /// The server's HTTPS address (the same CA as `[server]` is pinned).
    pub url: HttpsUrl,
    /// The release public key; only manifests signed with it are installed.
    pub public_key: ReleasePublicKey,
    /// How often the service looks for an update ([`crate::update::Updater::watch`]).
    pub check_interval: Duration,
}

impl<'de> Deserialize<'de> for ProxyUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (host, port) = parse_url(&s, "http", None).map_err(serde::de::Error::custom)?;
        Ok(ProxyUrl {
            host,
            port,
            credentials: None,
        })
    }
}

/// The `[server]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Where the server listens.
    pub url: ServerUrl,
    /// The server's CA certificate (PEM), pinned at enrollment.
    pub ca_cert: PathBuf,
    /// The agent's certificate (PEM).
    pub client_cert: PathBuf,
    /// The agent's private key (PEM).
    pub client_key: PathBuf,
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Whether orders are accepted.
    pub mode: Mode,
    /// Projectors talked to at once.
    pub concurrency: usize,
    /// When to collect.
    pub schedule: Schedule,
    /// The server.
    pub server: ServerConfig,
    /// HTTP proxy for the server connection.
    pub proxy: Option<ProxyUrl>,
    /// Self-update, when configured.
    pub update: Option<UpdateConfig>,
    /// The targets, in file order.
    pub targets: Vec<Target>,
}

// ---- raw file shape ------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    mode: Mode,
    concurrency: Option<Spanned<u64>>,
    #[serde(default)]
    schedule: RawSchedule,
    server: RawServer,
    proxy: Option<RawProxy>,
    update: Option<RawUpdate>,
    #[serde(default)]
    target: Vec<RawTarget>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    status_interval_seconds: Option<Spanned<u64>>,
    full_collection_interval_seconds: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    url: ServerUrl,
    ca_cert: Spanned<String>,
    client_cert: Spanned<String>,
    client_key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    url: ProxyUrl,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
}

impl RawProxy {
    fn validate(self, text: &str) -> Result<ProxyUrl, ConfigError> {
        let mut url = self.url;
        url.credentials = match (self.username, self.password) {
            (None, None) => None,
            (Some(u), None) => {
                return Err(ConfigError::at(
                    text,
                    Some(u.span()),
                    "proxy username without a password: give both or neither",
                ));
            }
            (None, Some(p)) => {
                return Err(ConfigError::at(
                    text,
                    Some(p.span()),
                    "proxy password without a username: give both or neither",
                ));
            }
            (Some(u), Some(p)) => Some(ProxyCredentials::new(u.get_ref(), p.get_ref()).map_err(
                |e| {
                    let span = match e {
                        CredentialsError::ControlCharacter("password")
                        | CredentialsError::TooLong("password") => p.span(),
                        _ => u.span(),
                    };
                    ConfigError::at(text, Some(span), e.to_string())
                },
            )?),
        };
        Ok(url)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    url: HttpsUrl,
    public_key: Spanned<String>,
    check_interval_seconds: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    address: Spanned<TargetSpec>,
    password: Option<Spanned<String>>,
    display_name: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    comment: Option<Spanned<String>>,
    #[serde(default)]
    session: SessionMode,
    http_port: Option<Spanned<u64>>,
}

fn bounded(
    text: &str,
    value: Option<Spanned<u64>>,
    key: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ConfigError> {
    let Some(v) = value else { return Ok(None) };
    if !range.contains(v.get_ref()) {
        return Err(ConfigError::at(
            text,
            Some(v.span()),
            format!(
                "{key} = {} is out of range; allowed {}..={}",
                v.get_ref(),
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(Some(*v.get_ref()))
}

fn text_field(
    text: &str,
    value: Option<Spanned<String>>,
    key: &str,
    max: usize,
) -> Result<Option<String>, ConfigError> {
    let Some(v) = value else { return Ok(None) };
    let span = v.span();
    let s = v.into_inner();
    if s.chars().count() > max {
        return Err(ConfigError::at(
            text,
            Some(span),
            format!("{key} is longer than {max} characters"),
        ));
    }
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ConfigError::at(
            text,
            Some(span),
            format!("{key} contains a control character"),
        ));
    }
    Ok(Some(s))
}

fn path_field(text: &str, value: Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
    if value.get_ref().trim().is_empty() {
        return Err(ConfigError::at(
            text,
            Some(value.span()),
            format!("{key} is empty"),
        ));
    }
    Ok(PathBuf::from(value.into_inner()))
}

impl AgentConfig {
    /// Parses and validates a configuration.
    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::at(text, e.span(), e.message().trim_end().to_owned()))?;
        let concurrency = bounded(text, raw.concurrency, "concurrency", CONCURRENCY_RANGE)?
            .map_or(DEFAULT_CONCURRENCY, |c| c as usize);
        let status_span = raw
            .schedule
            .status_interval_seconds
            .as_ref()
            .map(|s| s.span());
        let full_span = raw
            .schedule
            .full_collection_interval_seconds
            .as_ref()
            .map(|s| s.span());
        let status = bounded(
            text,
            raw.schedule.status_interval_seconds,
            "status_interval_seconds",
            STATUS_INTERVAL_RANGE,
        )?
        .map_or(DEFAULT_STATUS_INTERVAL, Duration::from_secs);
        let full = bounded(
            text,
            raw.schedule.full_collection_interval_seconds,
            "full_collection_interval_seconds",
            FULL_INTERVAL_RANGE,
        )?
        .map_or(DEFAULT_FULL_INTERVAL, Duration::from_secs);
        if full < status {
            return Err(ConfigError::at(
                text,
                full_span.or(status_span),
                format!(
                    "full_collection_interval_seconds ({}) is shorter than status_interval_seconds ({})",
                    full.as_secs(),
                    status.as_secs()
                ),
            ));
        }
        let server = ServerConfig {
            url: raw.server.url,
            ca_cert: path_field(text, raw.server.ca_cert, "ca_cert")?,
            client_cert: path_field(text, raw.server.client_cert, "client_cert")?,
            client_key: path_field(text, raw.server.client_key, "client_key")?,
        };
        let update = match raw.update {
            None => None,
            Some(u) => Some(UpdateConfig {
                url: u.url,
                public_key: u.public_key.get_ref().parse().map_err(|e: ReleaseError| {
                    ConfigError::at(text, Some(u.public_key.span()), e.to_string())
                })?,
                check_interval: bounded(
                    text,
                    u.check_interval_seconds,
                    "check_interval_seconds",
                    UPDATE_INTERVAL_RANGE,
                )?
                .map_or(DEFAULT_UPDATE_INTERVAL, Duration::from_secs),
            }),
        };
        let mut targets = Vec::with_capacity(raw.target.len());
        // Which target (by line) first claimed each address.
        let mut claimed: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for t in raw.target {
            let span = t.address.span();
            let line = line_of(text, span.start);
            let spec = *t.address.get_ref();
            let password = match t.password {
                None => None,
                Some(p) => Some(Password::new(p.get_ref()).map_err(|e| {
                    ConfigError::at(text, Some(p.span()), format!("password: {e}"))
                })?),
            };
            let meta = TargetMeta {
                display_name: text_field(text, t.display_name, "display_name", MAX_NAME_LEN)?,
                group: text_field(text, t.group, "group", MAX_NAME_LEN)?,
                comment: text_field(text, t.comment, "comment", MAX_COMMENT_LEN)?,
            };
            if claimed.len() + spec.len() > MAX_TOTAL_ADDRESSES {
                return Err(ConfigError::at(
                    text,
                    Some(span),
                    format!(
                        "the targets expand to more than {MAX_TOTAL_ADDRESSES} addresses in all"
                    ),
                ));
            }
            for addr in spec.addresses() {
                if let Some(first) = claimed.insert(addr, line) {
                    return Err(ConfigError::at(
                        text,
                        Some(span),
                        format!(
                            "{spec} includes {addr}, which the target on line {first} already covers"
                        ),
                    ));
                }
            }
            let http_port = bounded(text, t.http_port, "http_port", 1..=u64::from(u16::MAX))?
                .map_or(DEFAULT_HTTP_PORT, |p| p as u16);
            targets.push(Target {
                spec,
                password,
                meta,
                session: t.session,
                http_port,
                line,
            });
        }
        Ok(AgentConfig {
            mode: raw.mode,
            concurrency,
            schedule: Schedule {
                status_interval: status,
                full_collection_interval: full,
            },
            server,
            proxy: raw.proxy.map(|p| p.validate(text)).transpose()?,
            update,
            targets,
        })
    }

    /// Reads and validates a configuration file; errors name the file and line. Relative
    /// certificate paths are taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        let mut config = AgentConfig::parse(&text).map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })?;
        if let Some(dir) = path.parent() {
            for p in [
                &mut config.server.ca_cert,
                &mut config.server.client_cert,
                &mut config.server.client_key,
            ] {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(config)
    }

    /// Things an operator should know before starting with this configuration (files that
    /// do not exist yet, a configuration holding passwords that others may read). Not
    /// errors: certificates, for instance, appear only after enrollment.
    pub fn notes(&self, file: Option<&Path>) -> Vec<String> {
        let mut notes = Vec::new();
        for (key, p) in [
            ("ca_cert", &self.server.ca_cert),
            ("client_cert", &self.server.client_cert),
            ("client_key", &self.server.client_key),
        ] {
            if !p.exists() {
                notes.push(format!(
                    "{key} {} does not exist (yet): enroll the agent first",
                    p.display()
                ));
            }
        }
        #[cfg(unix)]
        if let Some(file) = file
            && (self.targets.iter().any(|t| t.password.is_some())
                || self.proxy.as_ref().is_some_and(|p| p.credentials.is_some()))
            && let Ok(meta) = std::fs::metadata(file)
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o004 != 0 {
                notes.push(format!(
                    "{} holds passwords and is readable by every user: chmod o-r",
                    file.display()
                ));
            }
        }
        #[cfg(not(unix))]
        let _ = file;
        notes
    }

    /// Every address the agent may contact, each once, in target order: the exact list and
    /// nothing else.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.targets
            .iter()
            .flat_map(|t| {
                t.spec.addresses().map(move |addr| Endpoint {
                    addr,
                    password: t.password.clone(),
                    session: t.session,
                    meta: t.meta.clone(),
                    http_port: Some(t.http_port),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Result<TargetSpec, TargetError> {
        s.parse()
    }

    #[test]
    fn single_addresses_and_ports() {
        assert_eq!(
            spec("192.168.1.10").unwrap(),
            TargetSpec::Single("192.168.1.10:3629".parse().unwrap())
        );
        assert_eq!(
            spec("192.168.1.10:4000").unwrap(),
            TargetSpec::Single("192.168.1.10:4000".parse().unwrap())
        );
        assert_eq!(
            spec("[fe80::1]:4000").unwrap(),
            TargetSpec::Single("[fe80::1]:4000".parse().unwrap())
        );
        assert_eq!(
            spec("fe80::1").unwrap(),
            TargetSpec::Single("[fe80::1]:3629".parse().unwrap())
        );
        assert_eq!(
            spec("10.0.0.1/32").unwrap(),
            TargetSpec::Single("10.0.0.1:3629".parse().unwrap())
        );
        assert!(matches!(
            spec("projector.local"),
            Err(TargetError::NotAnAddress(_))
        ));
        assert!(matches!(spec("10.0.0.1:0"), Err(TargetError::BadPort(_))));
        assert!(matches!(
            spec("10.0.0.1:70000"),
            Err(TargetError::BadPort(_))
        ));
        assert!(matches!(spec(""), Err(TargetError::Empty)));
        assert!(matches!(spec("0.0.0.0"), Err(TargetError::NotUnicast(_))));
        assert!(matches!(
            spec("255.255.255.255"),
            Err(TargetError::NotUnicast(_))
        ));
        assert!(matches!(spec("224.0.0.1"), Err(TargetError::NotUnicast(_))));
    }

    #[test]
    fn ranges_expand_exactly() {
        let r = spec("192.168.5.0/30:4000").unwrap();
        let got: Vec<String> = r.addresses().map(|a| a.to_string()).collect();
        assert_eq!(got, ["192.168.5.1:4000", "192.168.5.2:4000"]);
        assert_eq!(r.len(), 2);
        let r = spec("192.168.5.0/31").unwrap();
        let got: Vec<String> = r.addresses().map(|a| a.to_string()).collect();
        assert_eq!(got, ["192.168.5.0:3629", "192.168.5.1:3629"]);
        let r = spec("10.1.0.0/24").unwrap();
        assert_eq!(r.len(), 254);
        let all: Vec<SocketAddr> = r.addresses().collect();
        assert_eq!(all.len(), 254);
        assert_eq!(all[0], "10.1.0.1:3629".parse().unwrap());
        assert_eq!(all[253], "10.1.0.254:3629".parse().unwrap());
        let r = spec("10.2.0.0/16").unwrap();
        assert_eq!(r.addresses().count(), 65534);
        let r = spec("[fd00::/126]:10").unwrap();
        let got: Vec<String> = r.addresses().map(|a| a.to_string()).collect();
        assert_eq!(
            got,
            [
                "[fd00::]:10",
                "[fd00::1]:10",
                "[fd00::2]:10",
                "[fd00::3]:10"
            ]
        );
    }

    #[test]
    fn ranges_are_bounded_and_exact() {
        assert_eq!(
            spec("10.0.0.0/15").unwrap_err(),
            TargetError::RangeTooLarge {
                prefix: 15,
                count: 131_072,
                max: 65_536
            }
        );
        assert!(matches!(
            spec("fd00::/64"),
            Err(TargetError::RangeTooLarge { prefix: 64, .. })
        ));
        assert!(matches!(
            spec("fd00::/0"),
            Err(TargetError::RangeTooLarge { prefix: 0, .. })
        ));
        assert!(spec("10.0.0.0/16").is_ok());
        assert_eq!(
            spec("192.168.1.5/24").unwrap_err().to_string(),
            "192.168.1.5 has host bits set; the network is 192.168.1.0/24"
        );
        assert!(matches!(
            spec("10.0.0.0/33"),
            Err(TargetError::BadPrefix(..))
        ));
        assert!(matches!(
            spec("10.0.0.0/x"),
            Err(TargetError::BadPrefix(..))
        ));
    }

    #[test]
    fn display_parses_back() {
        for text in [
            "10.0.0.7:3629",
            "10.0.0.0/24:4000",
            "[fd00::1]:3629",
            "[fd00::/120]:3629",
        ] {
            let s = spec(text).unwrap();
            assert_eq!(s.to_string(), text);
            assert_eq!(spec(&s.to_string()).unwrap(), s);
        }
        assert!(CidrRange::new("10.0.0.0".parse().unwrap(), 8, 3629).is_err());
        assert!(CidrRange::new("10.0.0.1".parse().unwrap(), 24, 3629).is_err());
        assert!(CidrRange::new("10.0.0.0".parse().unwrap(), 24, 0).is_err());
        assert!(CidrRange::new("10.0.0.0".parse().unwrap(), 33, 1).is_err());
        assert!(matches!(
            spec("224.0.0.0/24"),
            Err(TargetError::NotUnicast(_))
        ));
        assert!(matches!(
            spec("0.0.0.0/16"),
            Err(TargetError::NotUnicast(_))
        ));
        assert!(matches!(
            spec("[ff02::/120]:1"),
            Err(TargetError::NotUnicast(_))
        ));
        let r = CidrRange::new("10.0.0.0".parse().unwrap(), 24, 1).unwrap();
        assert_eq!((r.prefix(), r.port(), r.len()), (24, 1, 254));
    }

    #[test]
    fn line_numbers_count_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtts://epmc.example.com", "mqtts", Some(8883)).unwrap(),
            ("epmc.example.com".into(), 8883)
        );
        assert_eq!(
            parse_url("mqtts://[::1]:443/", "mqtts", Some(8883)).unwrap(),
            ("::1".into(), 443)
        );
        assert!(parse_url("mqtt://x", "mqtts", Some(8883)).is_err());
        assert!(parse_url("mqtts://u:p@x", "mqtts", Some(8883)).is_err());
        assert!(parse_url("mqtts://user@x", "mqtts", Some(8883)).is_err());
        assert!(parse_url("mqtts://x/path", "mqtts", Some(8883)).is_err());
        assert!(parse_url("http://proxy", "http", None).is_err());
        assert!(parse_url("http://:80", "http", None).is_err());
    }
}
