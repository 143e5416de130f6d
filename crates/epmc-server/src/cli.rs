//! The operator's command line (`epmc-server`): parsing and the commands' logic. The binary only
//! installs the tracing subscriber and the crypto provider, parses, and runs [`run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::broker::BrokerConfig;
use crate::ca::{CertSerial, EnrollmentToken, RevokedCert};
use crate::datadir::{self, InitOutcome};
use crate::server::{ServeConfig, Server};
use crate::store::{
    AccountRole, AgentRecord, AgentState, DeviceSummary, OrderState, OrderTarget, Store,
    StoreError, StoreOptions, TenantId,
};
use clap::{Parser, Subcommand};
use epmc_proto::bounded::Timestamp;
use epmc_proto::model::DeviceStatus;
use epmc_proto::order::OrderAction;
use epmc_proto::topic::AgentId;
use epmc_proto::wire_name;
use time::OffsetDateTime;

/// What [`run`] returns when standard output was closed under it (`epmc-server devices |
/// head`): the binary then ends quietly, as Unix tools do, instead of failing on the next line.
pub const STDOUT_CLOSED: &str = "standard output closed";

/// `println!` for a command's answer: a closed standard output ends the command with
/// [`STDOUT_CLOSED`] instead of panicking as `println!` does.
macro_rules! say {
    ($($arg:tt)*) => {
        print_line(format_args!($($arg)*))?
    };
}

/// `println!` for what `serve` says while it runs: a closed standard output does not stop it.
macro_rules! shout {
    ($($arg:tt)*) => {{
        let _ = print_line(format_args!($($arg)*));
    }};
}

fn print_line(args: std::fmt::Arguments<'_>) -> Result<(), String> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(STDOUT_CLOSED.into()),
        Err(e) => Err(format!("standard output: {e}")),
    }
}

/// The command line of `epmc-server`.
#[derive(Parser)]
#[command(
    name = "epmc-server",
    version,
    about = "EPMC-rs server: ingest, storage, CA and orders"
)]
pub struct Cli {
    /// The data directory (CA, certificates, SQLite database).
    #[arg(
        long,
        env = "EPMC_DATA",
        global = true,
        default_value = "/var/lib/epmc-server"
    )]
    pub data: PathBuf,
    /// A database URL (postgres://… or sqlite://…) instead of the data directory's SQLite file.
    #[arg(long, env = "EPMC_DATABASE", global = true)]
    pub database: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Creates the data directory: CA, server certificate, database and the first admin
    /// account, whose generated password is printed once (changes nothing if it exists).
    Init {
        /// Names and addresses the server certificate is valid for (localhost and 127.0.0.1
        /// are always included).
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
    },
    /// Runs the server until SIGTERM or Ctrl-C.
    Serve {
        /// MQTT over TLS listener for agents.
        #[arg(long, default_value = "127.0.0.1:8883")]
        mqtt: SocketAddr,
        /// HTTPS listener (enrollment).
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// Scale mode: consume agents' messages from this broker (mqtts://HOST:PORT) with a
        /// shared subscription instead of listening on --mqtt (see deploy/scale/README.md).
        #[arg(long, value_name = "URL")]
        broker: Option<String>,
        /// This replica's client id and certificate CN at the broker (each replica its own;
        /// the broker's ACL grants the server's rights to it).
        #[arg(long, default_value = "epmc-server", requires = "broker")]
        broker_client_id: String,
        /// The shared subscription group the replicas split the messages in.
        #[arg(long, default_value = "epmc", requires = "broker")]
        broker_group: String,
        /// Where to write the CA's revocation list for the broker (Mosquitto's crlfile).
        #[arg(long, value_name = "FILE", requires = "broker")]
        broker_crl: Option<PathBuf>,
        /// Delete history series, events, agents' exception-log entries, records of message
        /// ids and rejected messages older than this many days, and replicas' certificates
        /// expired for longer (checked hourly); kept for ever when not given. Orders and
        /// security events are kept.
        #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=36_500))]
        retention_days: Option<u32>,
    },
    /// Writes the CA's current revocation list (PEM) for an external broker (Mosquitto's
    /// crlfile), e.g. before the broker's first start.
    Crl {
        /// The file to write (replaced atomically).
        #[arg(long)]
        out: PathBuf,
    },
    /// Tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// The client certificates server replicas issued themselves for the broker (scale mode).
    Replica {
        #[command(subcommand)]
        command: ReplicaCommand,
    },
    /// Accounts of people (the portal logs in with them): admins and tenants' users.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Lists devices with their latest status and last contact.
    Devices {
        /// Only this tenant's devices.
        #[arg(long)]
        tenant: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One device: what `devices` shows, then its information (inputs included), settings,
    /// logs and latest events, as its agent last reported them.
    Device {
        /// The device (its number in `devices`).
        id: i64,
        /// How many of its latest events to show.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=1000))]
        events: u32,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Orders.
    Order {
        #[command(subcommand)]
        command: OrderCommand,
    },
    /// Lists the latest security events, newest first: refused connections and handshakes,
    /// rule violations, refused enrollment tokens, and the counts of those over the rate
    /// (kind `suppressed`).
    SecurityEvents {
        /// How many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Agent releases: signing key, signed manifests, publishing (see `release --help`).
    Release {
        #[command(subcommand)]
        command: crate::release::ReleaseCommand,
    },
}

/// Subcommands of `tenant`.
#[derive(Subcommand)]
pub enum TenantCommand {
    /// Adds a tenant.
    Add {
        /// Its unique name.
        name: String,
    },
    /// Lists tenants.
    List,
}

/// Subcommands of `token`.
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Prints a one-time enrollment token for a tenant.
    Create {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        /// How long it is valid, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        expires: Duration,
    },
}

/// Subcommands of `agent`.
#[derive(Subcommand)]
pub enum AgentCommand {
    /// Issues a certificate for an agent that cannot reach the enrollment endpoint; writes
    /// ca.crt, agent.crt and agent.key to DIR and prints the new agent id.
    Issue {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        /// Where to write the files (must not hold them already).
        #[arg(long)]
        out: PathBuf,
        /// A name for the agent.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Lists agents: id, tenant, name, state (online, offline, never connected, revoked),
    /// version, last seen.
    List {
        /// Only this tenant's agents (its name).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revokes an agent's certificates; a running server closes its connection.
    Revoke {
        /// The agent id.
        id: String,
        /// Why (recorded).
        #[arg(long, default_value = "revoked by the operator")]
        reason: String,
    },
}

/// Subcommands of `replica`.
#[derive(Subcommand)]
pub enum ReplicaCommand {
    /// Lists the certificates replicas issued themselves: serial, name, issued, expires,
    /// revoked.
    List,
    /// Revokes every certificate issued so far to a replica (e.g. a leaked key); `crl` and a
    /// running replica's CRL file then list them. A running replica issues itself a new one
    /// at its next connection.
    Revoke {
        /// The replica's name (its --broker-client-id).
        name: String,
        /// Why (recorded).
        #[arg(long, default_value = "revoked by the operator")]
        reason: String,
    },
}

/// Subcommands of `account`.
#[derive(Subcommand)]
pub enum AccountCommand {
    /// Lists accounts: name, role, tenant.
    List,
    /// Adds an account and prints its generated password (once: it is stored only hashed).
    Add {
        /// Its unique name (letters, digits, '.', '_', '-', '@').
        name: String,
        /// admin (everything) or tenant (one tenant's devices and orders).
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The tenant's name (with --role tenant).
        #[arg(long, required_if_eq("role", "tenant"))]
        tenant: Option<String>,
    },
    /// Gives an account a new generated password and prints it (once); the old one stops
    /// working.
    Passwd {
        /// The account's name.
        name: String,
    },
}

/// `--role` of `account add`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    /// Everything.
    Admin,
    /// One tenant's user.
    Tenant,
}

/// Subcommands of `order`.
#[derive(Subcommand)]
pub enum OrderCommand {
    /// Queues an order for a device and waits for its result.
    Send {
        /// The device (its number in `devices`).
        #[arg(long)]
        device: i64,
        /// collect_now, power_on, power_off, av_mute (VALUE on|off), source_change (VALUE an
        /// input's name as the device lists it, or its hex code), change_setting (VALUE
        /// NAME=VALUE), copy_settings (VALUE SOURCE=PROFILE, SOURCE a device number of the same
        /// agent).
        action: String,
        /// The action's value.
        value: Option<String>,
        /// How long the order may wait for the agent.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        expires: Duration,
        /// How long to wait for the result here.
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        wait: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
    let unit = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    // At most 100 years: a later instant is not a time an order or a token can have.
    n.checked_mul(unit)
        .filter(|secs| *secs <= 100 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: longer than 100 years"))
}

/// The actions `order send` takes, as `--help` lists them.
const ACTIONS: &str = "collect_now, power_on, power_off, av_mute, source_change, change_setting, \
                       copy_settings, check_agent_update";

fn parse_action(action: &str, value: Option<&str>) -> Result<OrderAction, String> {
    let json = match (action, value) {
        ("collect_now" | "power_on" | "power_off" | "check_agent_update", None) => {
            serde_json::json!({ "action": action })
        }
        ("collect_now" | "power_on" | "power_off" | "check_agent_update", Some(v)) => {
            return Err(format!("{action} takes no value (got {v:?})"));
        }
        ("av_mute", Some(v @ ("on" | "off"))) => {
            serde_json::json!({ "action": action, "on": v == "on" })
        }
        ("av_mute", Some(v)) => return Err(format!("av_mute takes on or off (got {v:?})")),
        ("av_mute", None) => return Err("av_mute takes on or off".into()),
        ("source_change", Some(v)) => serde_json::json!({ "action": action, "source": v }),
        ("source_change", None) => {
            return Err(
                "source_change takes an input: its name as the device lists it (e.g. HDMI2) \
                 or its SOURCE code, two hex digits (e.g. A0)"
                    .into(),
            );
        }
        ("change_setting", Some(v)) => {
            let (name, value) = v
                .split_once('=')
                .ok_or_else(|| format!("{v:?}: change_setting takes NAME=VALUE"))?;
            serde_json::json!({ "action": action, "name": name, "value": value })
        }
        ("change_setting", None) => return Err("change_setting takes NAME=VALUE".into()),
        _ => return Err(format!("{action:?}: not an action; one of {ACTIONS}")),
    };
    serde_json::from_value(json).map_err(|e| format!("{action} {}: {e}", value.unwrap_or("")))
}

/// `device ID`: the device's row, then each part of its details as `key  value` lines (every
/// field its agent reported, by its wire name), then its latest events.
async fn show_device(store: &Store, id: i64, events: u32, json: bool) -> Result<(), String> {
    let details = store
        .admin()
        .device_details(id)
        .await
        .map_err(|e| format!("device {id}: {e}"))?;
    let d = &details.summary;
    let recent = store
        .tenant(d.tenant)
        .events(id, events)
        .await
        .map_err(|e| e.to_string())?;
    let agent = store
        .admin()
        .agents(Some(d.tenant))
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|a| a.id == d.agent);
    let agent_state = agent_word(agent.as_ref());
    if json {
        let mut doc = device_json(d, agent_state);
        if let Some(fields) = doc.as_object_mut() {
            fields.extend([
                ("group".to_owned(), value(&details.group_name)),
                ("comment".to_owned(), value(&details.comment)),
                ("info".to_owned(), value(&details.info)),
                ("settings".to_owned(), value(&details.settings)),
                ("logs".to_owned(), value(&details.logs)),
                (
                    "events".to_owned(),
                    recent
                        .iter()
                        .map(|e| serde_json::json!({ "at": e.at, "event": e.event }))
                        .collect(),
                ),
            ]);
        }
        say!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let opt = |v: Option<&str>| v.map_or("-".into(), one_line);
    say!("device {}  {}  {}", d.id, d.key, opt(d.name.as_deref()));
    let mut rows: Vec<(&str, String)> = vec![
        ("agent", format!("{} ({agent_state})", d.agent)),
        ("address", opt(d.address.as_deref())),
        ("group", opt(details.group_name.as_deref())),
        ("comment", opt(details.comment.as_deref())),
        ("first seen", fmt_ts(d.first_seen)),
        ("last contact", fmt_ts(d.last_contact)),
    ];
    if let Some(u) = &d.unreachable {
        rows.push((
            "unreachable",
            format!("since {}: {}", fmt_ts(u.since), one_line(&u.reason)),
        ));
    }
    for (k, v) in rows {
        say!("  {k:<34} {v}");
    }
    let parts: [(String, serde_json::Value); 4] = [
        (
            match &d.status {
                Some((at, _)) => format!("status (observed {})", fmt_ts(*at)),
                None => "status".into(),
            },
            value(&d.status.as_ref().map(|(_, s)| s)),
        ),
        ("information".into(), value(&details.info)),
        ("settings".into(), value(&details.settings)),
        ("logs".into(), value(&details.logs)),
    ];
    for (title, part) in parts {
        say!("{title}");
        match part {
            serde_json::Value::Object(fields) if !fields.is_empty() => {
                for (k, v) in fields {
                    say!("  {k:<34} {}", cell(&v));
                }
            }
            _ => say!("  (not reported)"),
        }
    }
    say!("events (latest {})", recent.len());
    for e in &recent {
        let event = serde_json::to_value(&e.event).unwrap_or_default();
        say!("  {}  {}", fmt_ts(e.at), cell(&event));
    }
    Ok(())
}

/// How a device's agent stands: `online`, `offline`, `never`, `revoked` (`unknown` if absent).
fn agent_word(agent: Option<&AgentRecord>) -> &'static str {
    match agent {
        Some(a) if a.revoked_at.is_some() => "revoked",
        Some(a) => a.state.as_str(),
        None => "unknown",
    }
}

/// A device as `devices --json` lists it (and `device --json` begins it).
fn device_json(d: &DeviceSummary, agent_state: &str) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "key": d.key,
        "serial": d.serial,
        "tenant": d.tenant.to_string(),
        "agent": d.agent.to_string(),
        "agent_state": agent_state,
        "name": d.name,
        "address": d.address,
        "first_seen": d.first_seen,
        "last_contact": d.last_contact,
        "status": d.status.as_ref().map(|(at, s)| serde_json::json!({
            "observed_at": at,
            "status": s,
        })),
        "unreachable": d.unreachable.as_ref().map(|u| serde_json::json!({
            "since": u.since,
            "reason": u.reason,
        })),
    })
}

/// A JSON value on one line for a table: a string as itself, anything else as compact JSON;
/// control characters escaped either way.
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => one_line(s),
        other => one_line(&other.to_string()),
    }
}

/// A value as JSON (`null` if it cannot be: none of the store's types).
fn value<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// A device's latest status as the `devices` table shows it: the wire's names (as in
/// `--json` and the agent's screen), `-` where nothing was reported.
struct StatusCells {
    power: String,
    source: String,
    av_mute: String,
    state: String,
}

impl StatusCells {
    fn of(status: Option<&DeviceStatus>) -> StatusCells {
        let Some(s) = status else {
            let none = || "-".to_owned();
            return StatusCells {
                power: none(),
                source: none(),
                av_mute: none(),
                state: none(),
            };
        };
        let problems = s.problems();
        StatusCells {
            power: s.power.as_ref().map_or("-".into(), wire_name),
            source: s.source.as_ref().map_or("-".into(), |src| {
                src.name.as_ref().map_or_else(
                    || format!("{:02X}", src.code.get()),
                    |n| one_line(n.as_str()),
                )
            }),
            av_mute: s
                .av_mute
                .map_or("-", |on| if on { "on" } else { "off" })
                .into(),
            state: if problems.is_empty() {
                "ok".into()
            } else {
                problems.join(", ")
            },
        }
    }
}

fn is_hex_code(s: &str) -> bool {
    s.len() == 2 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `source_change NAME`: the code of the input the device listed under that name in its
/// latest full collection (`SOURCELIST?`), compared without regard to case.
async fn source_change_by_name(
    store: &Store,
    device: i64,
    name: &str,
) -> Result<OrderAction, String> {
    let details = store
        .admin()
        .device_details(device)
        .await
        .map_err(|e| format!("--device {device}: {e}"))?;
    let listed = details
        .info
        .and_then(|i| i.sources)
        .map(|s| s.as_slice().to_vec())
        .unwrap_or_default();
    if let Some(found) = listed.iter().find(|s| {
        s.name
            .as_ref()
            .is_some_and(|n| n.as_str().eq_ignore_ascii_case(name))
    }) {
        return Ok(OrderAction::SourceChange { source: found.code });
    }
    if listed.is_empty() {
        return Err(format!(
            "source_change {name:?}: device {device} has not listed its inputs yet (no full \
             collection with SOURCELIST?); give the SOURCE code, two hex digits"
        ));
    }
    let inputs: Vec<String> = listed.iter().map(|s| one_line(&s.to_string())).collect();
    Err(format!(
        "source_change {name:?}: not an input of device {device}; it has {}",
        inputs.join(", ")
    ))
}

/// `copy_settings SOURCE=PROFILE`: SOURCE is a device number from `devices`, reported by the
/// same agent as the target (the agent reads one and writes the other).
async fn copy_settings_action(
    store: &Store,
    target: i64,
    value: Option<&str>,
) -> Result<OrderAction, String> {
    let v = value.ok_or("copy_settings takes SOURCE=PROFILE (SOURCE: a device number)")?;
    let (source, profile) = v
        .split_once('=')
        .ok_or_else(|| format!("{v:?}: copy_settings takes SOURCE=PROFILE"))?;
    let source: i64 = source
        .trim()
        .parse()
        .map_err(|_| format!("{source:?}: SOURCE is a device number (see `devices`)"))?;
    let devices = store.admin().devices().await.map_err(|e| e.to_string())?;
    let find = |id: i64| {
        devices
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| format!("no device {id}"))
    };
    let (source, target) = (find(source)?, find(target)?);
    if source.agent != target.agent {
        return Err(format!(
            "device {} and device {} are reported by different agents; settings are copied by one agent",
            source.id, target.id
        ));
    }
    serde_json::from_value(serde_json::json!({
        "action": "copy_settings",
        "source_device": source.key,
        "profile": profile,
    }))
    .map_err(|e| format!("copy_settings: {e}"))
}

/// The database of an initialised data directory (or `--database`): opening a missing SQLite
/// file would create an empty database in a mistyped directory, so that is refused.
async fn open_store(cli: &Cli) -> Result<Store, String> {
    if cli.database.is_none() {
        let file = cli.data.join(datadir::DATABASE);
        if !file.is_file() {
            return Err(format!(
                "{}: no database here; --data (or EPMC_DATA) must be a directory made by \
                 `epmc-server init` (or give --database)",
                file.display()
            ));
        }
    }
    open_or_create_store(cli).await
}

/// The database, created (and migrated) when missing: for `init`.
async fn open_or_create_store(cli: &Cli) -> Result<Store, String> {
    let store = match &cli.database {
        Some(url) => Store::open(url).await,
        None => Store::open_data_dir(&cli.data, StoreOptions::default()).await,
    };
    store.map_err(|e| format!("database: {e}"))
}

async fn tenant_by_name(store: &Store, name: &str) -> Result<TenantId, String> {
    store
        .admin()
        .tenants()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|t| t.name == name)
        .map(|t| t.id)
        .ok_or_else(|| format!("--tenant {name:?}: no such tenant (see `tenant list`)"))
}

fn timestamp_in(d: Duration) -> Result<Timestamp, String> {
    Timestamp::from_unix(Timestamp::now().unix() + d.as_secs() as i64).map_err(|e| e.to_string())
}

/// Runs one parsed command line; the error is the message for the operator.
pub async fn run(cli: Cli) -> Result<(), String> {
    match &cli.command {
        Command::Release { command } => command
            .run(&cli.data, &mut std::io::stdout().lock())
            .map_err(|e| e.to_string()),
        Command::Init { hostnames } => {
            match datadir::init(&cli.data, hostnames).map_err(|e| e.to_string())? {
                InitOutcome::Created { ca_fingerprint } => {
                    say!(
                        "created {} (CA fingerprint {})",
                        cli.data.display(),
                        ca_fingerprint.to_hex()
                    );
                }
                InitOutcome::AlreadyInitialized { ca_fingerprint } => {
                    say!(
                        "{} is already initialized; nothing changed (CA fingerprint {})",
                        cli.data.display(),
                        ca_fingerprint.to_hex()
                    );
                }
            }
            let store = open_or_create_store(&cli).await?;
            let first = store.accounts().create_first_admin().await;
            store.close().await;
            match first.map_err(|e| format!("the first admin account: {e}"))? {
                Some(password) => say!(
                    "created the admin account {:?}; its password, shown only now: {}",
                    crate::store::FIRST_ADMIN,
                    password.expose()
                ),
                None => say!("accounts exist already; none created"),
            }
            Ok(())
        }
        Command::Serve {
            mqtt,
            https,
            broker,
            broker_client_id,
            broker_group,
            broker_crl,
            retention_days,
        } => {
            let mut config = ServeConfig::new(&cli.data);
            config.mqtt = *mqtt;
            config.https = *https;
            config.database = cli.database.clone();
            config.retention = retention_days.map(|d| Duration::from_secs(u64::from(d) * 86_400));
            if let Some(url) = broker {
                let mut b = BrokerConfig::from_url(url).map_err(|e| format!("--broker {e}"))?;
                b.client_id = broker_client_id.clone();
                b.group = broker_group.clone();
                b.crl_file = broker_crl.clone();
                if b.group.is_empty() || b.group.contains(['/', '+', '#']) {
                    return Err(format!(
                        "--broker-group {:?}: must be non-empty, without '/', '+' or '#'",
                        b.group
                    ));
                }
                config.broker = Some(b);
            }
            let server = Server::start(config).await.map_err(|e| e.to_string())?;
            match (server.mqtt_addr(), broker) {
                (Some(addr), _) => shout!(
                    "listening: agents on mqtts://{addr} , enrollment on https://{}",
                    server.https_addr()
                ),
                (None, Some(url)) => shout!(
                    "consuming: agents through {url} as {broker_client_id} (group {broker_group}), enrollment on https://{}",
                    server.https_addr()
                ),
                (None, None) => {}
            }
            shutdown_signal().await;
            // The counters are read after the shutdown, so they hold its last commits.
            let endpoint = server.endpoint().cloned();
            let broker = server.broker().cloned();
            server.shutdown().await;
            if let Some(endpoint) = endpoint {
                let stats = endpoint.stats();
                shout!(
                    "stopped: {} message(s) committed in {} batch(es) ({} rejected, {} duplicate(s)) over {} connection(s); {} refused over the limit, {} closed for a violation",
                    stats.committed,
                    stats.batches,
                    stats.rejected,
                    stats.duplicates,
                    stats.sessions,
                    stats.refused,
                    stats.violations
                );
            }
            if let Some(broker) = broker {
                let stats = broker.stats();
                shout!(
                    "stopped: {} message(s) committed in {} batch(es) over {} connection(s)",
                    stats.committed,
                    stats.batches,
                    stats.connections
                );
            }
            Ok(())
        }
        Command::Crl { out } => {
            let pki = datadir::load(&cli.data).map_err(|e| e.to_string())?;
            let store = open_store(&cli).await?;
            let revoked = store
                .admin()
                .revoked_serials()
                .await
                .map_err(|e| e.to_string())?;
            store.close().await;
            let list: Vec<RevokedCert> = revoked
                .iter()
                .map(|s| {
                    s.parse::<CertSerial>()
                        .map(|serial| RevokedCert {
                            serial,
                            revoked_at: OffsetDateTime::now_utc(),
                        })
                        .map_err(|e| format!("a revoked serial in the database: {e}"))
                })
                .collect::<Result<_, _>>()?;
            crate::broker::write_crl(&pki.ca, &list, out)?;
            say!("{}: {} revoked certificate(s)", out.display(), list.len());
            Ok(())
        }
        Command::Tenant { command } => {
            let store = open_store(&cli).await?;
            match command {
                TenantCommand::Add { name } => {
                    let id = store
                        .admin()
                        .add_tenant(name)
                        .await
                        .map_err(|e| format!("tenant {name:?}: {e}"))?;
                    say!("{id}");
                }
                TenantCommand::List => {
                    for t in store.admin().tenants().await.map_err(|e| e.to_string())? {
                        say!("{}\t{}", t.id, t.name);
                    }
                }
            }
            store.close().await;
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Create { tenant, expires },
        } => {
            let pki = datadir::load(&cli.data).map_err(|e| e.to_string())?;
            let store = open_store(&cli).await?;
            let tenant = tenant_by_name(&store, tenant).await?;
            let token =
                EnrollmentToken::generate(pki.ca.fingerprint()).map_err(|e| e.to_string())?;
            store
                .admin()
                .register_token(
                    tenant,
                    timestamp_in(*expires)?,
                    &token.secret_hash().to_hex(),
                )
                .await
                .map_err(|e| e.to_string())?;
            say!("{}", token.to_token_string());
            store.close().await;
            Ok(())
        }
        Command::Agent { command } => {
            let store = open_store(&cli).await?;
            match command {
                AgentCommand::Issue { tenant, out, name } => {
                    let pki = datadir::load(&cli.data).map_err(|e| e.to_string())?;
                    // Before the agent is created: a refused --out leaves no agent behind.
                    datadir::check_agent_bundle_target(out).map_err(|e| e.to_string())?;
                    let tenant = tenant_by_name(&store, tenant).await?;
                    let admin = store.admin();
                    let agent = admin
                        .create_agent(tenant, name)
                        .await
                        .map_err(|e| e.to_string())?;
                    let bundle = pki
                        .ca
                        .issue_agent_with_key(agent.uuid(), OffsetDateTime::now_utc())
                        .map_err(|e| e.to_string())?;
                    datadir::write_agent_bundle(out, &bundle).map_err(|e| e.to_string())?;
                    let not_after =
                        Timestamp::from_unix(bundle.certificate.not_after.unix_timestamp())
                            .map_err(|e| e.to_string())?;
                    admin
                        .record_certificate(agent, &bundle.certificate.serial.to_hex(), not_after)
                        .await
                        .map_err(|e| e.to_string())?;
                    say!("{agent}");
                }
                AgentCommand::List { tenant } => {
                    let only = match tenant {
                        Some(name) => Some(tenant_by_name(&store, name).await?),
                        None => None,
                    };
                    let tenants = store.admin().tenants().await.map_err(|e| e.to_string())?;
                    let agents = store
                        .admin()
                        .agents(only)
                        .await
                        .map_err(|e| e.to_string())?;
                    say!("id\ttenant\tname\tstate\tversion\tlast seen");
                    for a in agents {
                        let tenant = tenants
                            .iter()
                            .find(|t| t.id == a.tenant)
                            .map_or_else(|| a.tenant.to_string(), |t| one_line(&t.name));
                        let state = match agent_word(Some(&a)) {
                            "never" => "never connected",
                            word => word,
                        };
                        say!(
                            "{}\t{}\t{}\t{}\t{}\t{}",
                            a.id,
                            tenant,
                            if a.name.is_empty() {
                                "-".into()
                            } else {
                                one_line(&a.name)
                            },
                            state,
                            a.version.as_deref().map_or("-".into(), one_line),
                            a.last_seen.map(fmt_ts).unwrap_or("-".into())
                        );
                    }
                }
                AgentCommand::Revoke { id, reason } => {
                    let agent =
                        AgentId::parse(id).map_err(|_| format!("{id:?}: not an agent id"))?;
                    let serials = store
                        .admin()
                        .revoke_agent(agent, reason)
                        .await
                        .map_err(|e| format!("agent {id}: {e}"))?;
                    say!(
                        "revoked {} certificate(s) of {agent}; a running server closes its connection",
                        serials.len()
                    );
                }
            }
            store.close().await;
            Ok(())
        }
        Command::Replica { command } => {
            let store = open_store(&cli).await?;
            let admin = store.admin();
            let result = match command {
                ReplicaCommand::List => admin
                    .service_certificates()
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|list| {
                    for c in list {
                        say!(
                            "{}\t{}\t{}\t{}\t{}",
                            c.serial,
                            c.name,
                            fmt_ts(c.issued_at),
                            fmt_ts(c.not_after),
                            c.revoked_at.map(fmt_ts).unwrap_or("-".into())
                        );
                    }
                    Ok(())
                }),
                ReplicaCommand::Revoke { name, reason } => admin
                    .revoke_service(name, reason)
                    .await
                    .map_err(|e| match e {
                        StoreError::NotFound => format!("no certificate was ever issued to {name:?} (see `replica list`)"),
                        e => e.to_string(),
                    })
                    .and_then(|serials| {
                        say!(
                            "revoked {} certificate(s) of replica {name}; write the broker's CRL (`crl`) or let a running replica rewrite it",
                            serials.len()
                        );
                        Ok(())
                    }),
            };
            store.close().await;
            result.map_err(|e| {
                if e == STDOUT_CLOSED {
                    e
                } else {
                    format!("replica: {e}")
                }
            })
        }
        Command::Account { command } => {
            let store = open_store(&cli).await?;
            let result = account_command(&store, command).await;
            store.close().await;
            result
        }
        Command::Devices { tenant, json } => {
            let store = open_store(&cli).await?;
            let only = match tenant {
                Some(name) => Some(tenant_by_name(&store, name).await?),
                None => None,
            };
            let devices = match only {
                Some(t) => store.tenant(t).devices().await,
                None => store.admin().devices().await,
            }
            .map_err(|e| e.to_string())?;
            // What is known of a device is only as fresh as its agent's connection.
            let agents: std::collections::HashMap<AgentId, AgentRecord> = store
                .admin()
                .agents(only)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|a| (a.id, a))
                .collect();
            if *json {
                let list: Vec<serde_json::Value> = devices
                    .iter()
                    .map(|d| device_json(d, agent_word(agents.get(&d.agent))))
                    .collect();
                say!(
                    "{}",
                    serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?
                );
            } else {
                say!("id\tkey\tname\taddress\tpower\tsource\tA/V mute\tstate\tlast contact");
                for d in devices {
                    let status = d.status.as_ref().map(|(_, s)| s);
                    let mut cells = StatusCells::of(status);
                    let agent = agents.get(&d.agent);
                    if let Some(a) = agent.filter(|a| a.revoked_at.is_some()) {
                        cells.state = format!(
                            "agent revoked {}",
                            a.revoked_at.map(fmt_ts).unwrap_or_default()
                        );
                    } else if let Some(a) = agent.filter(|a| a.state == AgentState::Offline) {
                        // Nothing newer can come until it reconnects.
                        cells.state = format!(
                            "agent offline since {}",
                            a.last_seen.map(fmt_ts).unwrap_or("-".into())
                        );
                    } else if let Some(u) = &d.unreachable {
                        // Its status is from before: the agent cannot reach it now.
                        cells.state = format!(
                            "unreachable since {}: {}",
                            fmt_ts(u.since),
                            one_line(&u.reason)
                        );
                    }
                    say!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        d.id,
                        d.key,
                        d.name.as_deref().map_or("-".into(), one_line),
                        d.address.as_deref().map_or("-".into(), one_line),
                        cells.power,
                        cells.source,
                        cells.av_mute,
                        cells.state,
                        fmt_ts(d.last_contact)
                    );
                }
            }
            store.close().await;
            Ok(())
        }
        Command::Device { id, events, json } => {
            let store = open_store(&cli).await?;
            let shown = show_device(&store, *id, *events, *json).await;
            store.close().await;
            shown
        }
        Command::SecurityEvents { limit, json } => {
            let store = open_store(&cli).await?;
            let events = store.admin().security_events(*limit).await;
            store.close().await;
            let events = events.map_err(|e| e.to_string())?;
            if *json {
                let list: Vec<serde_json::Value> = events
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "at": e.at,
                            "kind": e.kind,
                            "agent": e.agent,
                            "peer": e.peer,
                            "detail": e.detail,
                        })
                    })
                    .collect();
                say!(
                    "{}",
                    serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?
                );
            } else {
                say!("at\tkind\tagent\tpeer\tdetail");
                for e in events {
                    say!(
                        "{}\t{}\t{}\t{}\t{}",
                        fmt_ts(e.at),
                        one_line(&e.kind),
                        e.agent.as_deref().map_or("-".into(), one_line),
                        e.peer.as_deref().map_or("-".into(), one_line),
                        one_line(&e.detail)
                    );
                }
            }
            Ok(())
        }
        Command::Order {
            command:
                OrderCommand::Send {
                    device,
                    action,
                    value,
                    expires,
                    wait,
                },
        } => {
            let store = open_store(&cli).await?;
            let action = if action == "copy_settings" {
                copy_settings_action(&store, *device, value.as_deref()).await?
            } else if let ("source_change", Some(name)) = (action.as_str(), value.as_deref())
                && !is_hex_code(name)
            {
                source_change_by_name(&store, *device, name).await?
            } else {
                parse_action(action, value.as_deref())?
            };
            let orders = store.orders();
            let id = orders
                .create(
                    OrderTarget::Device(*device),
                    &action,
                    "operator",
                    timestamp_in(*expires)?,
                )
                .await
                .map_err(|e| format!("--device {device}: {e}"))?;
            say!("order {id} queued");
            let deadline = tokio::time::Instant::now() + *wait;
            let mut last = OrderState::Queued;
            loop {
                let order = orders.get(id).await.map_err(|e| e.to_string())?;
                if order.state != last {
                    say!("{}", order.state.as_str());
                    last = order.state;
                }
                match order.state {
                    OrderState::Done
                    | OrderState::Failed
                    | OrderState::TimedOut
                    | OrderState::Expired => {
                        if let Some(result) = order.result {
                            say!("{result}");
                        }
                        store.close().await;
                        return if order.state == OrderState::Done {
                            Ok(())
                        } else {
                            Err(format!("order {id}: {}", order.state.as_str()))
                        };
                    }
                    _ => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    store.close().await;
                    return Err(format!(
                        "order {id}: no result within {wait:?} (still {}); it stays queued until it expires",
                        order.state.as_str()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn account_command(store: &Store, command: &AccountCommand) -> Result<(), String> {
    let accounts = store.accounts();
    match command {
        AccountCommand::List => {
            let tenants = store.admin().tenants().await.map_err(|e| e.to_string())?;
            for a in accounts.list().await.map_err(|e| e.to_string())? {
                let (role, tenant) = match a.role {
                    AccountRole::Admin => ("admin", "-".to_owned()),
                    AccountRole::Tenant(t) => (
                        "tenant",
                        tenants
                            .iter()
                            .find(|x| x.id == t)
                            .map_or_else(|| t.to_string(), |x| x.name.clone()),
                    ),
                };
                say!(
                    "{}\t{role}\t{tenant}\t{}",
                    a.name,
                    fmt_ts(a.password_changed_at)
                );
            }
        }
        AccountCommand::Add { name, role, tenant } => {
            let role = match (role, tenant) {
                (RoleArg::Admin, None) => AccountRole::Admin,
                (RoleArg::Admin, Some(_)) => {
                    return Err(
                        "--tenant is for --role tenant only: an admin sees every tenant".into(),
                    );
                }
                (RoleArg::Tenant, Some(t)) => AccountRole::Tenant(tenant_by_name(store, t).await?),
                (RoleArg::Tenant, None) => return Err("--role tenant needs --tenant NAME".into()),
            };
            let password = accounts
                .create(name, role)
                .await
                .map_err(|e| format!("account {name:?}: {e}"))?;
            say!(
                "created account {name:?}; its password, shown only now: {}",
                password.expose()
            );
        }
        AccountCommand::Passwd { name } => {
            let password = accounts
                .set_password(name)
                .await
                .map_err(|e| format!("account {name:?}: {e}"))?;
            say!(
                "new password of {name:?}, shown only now: {}",
                password.expose()
            );
        }
    }
    Ok(())
}

/// RFC 3339, as the JSON contract writes it.
/// `s` for one cell of a tab-separated line on a terminal: control characters (tabs, line
/// breaks, escape sequences a device or a peer could put in a name) escaped.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn fmt_ts(t: Timestamp) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn durations_have_a_unit_and_a_bound() {
        use super::parse_duration;
        use std::time::Duration;
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("5x").unwrap_err().contains("\"5x\""));
        assert!(parse_duration("h").unwrap_err().contains("a number"));
        // Overflowed before (u64 multiplication).
        assert!(
            parse_duration("999999999999999999d")
                .unwrap_err()
                .contains("100 years")
        );
        assert!(parse_duration("36501d").is_err());
        assert!(parse_duration("36500d").is_ok());
    }

    #[test]
    fn actions_and_their_values_are_parsed_or_refused_by_name() {
        use super::parse_action;
        use epmc_proto::order::OrderAction;
        assert_eq!(parse_action("power_on", None), Ok(OrderAction::PowerOn));
        assert_eq!(
            parse_action("av_mute", Some("off")),
            Ok(OrderAction::AvMute { on: false })
        );
        match parse_action("source_change", Some("A0")) {
            Ok(OrderAction::SourceChange { source }) => assert_eq!(source.get(), 0xA0),
            other => panic!("{other:?}"),
        }
        let refused = |action: &str, value: Option<&str>| {
            let e = parse_action(action, value).unwrap_err();
            assert!(!e.contains("None") && !e.contains("Some("), "{e}");
            e
        };
        // An unknown action: the list of the known ones.
        assert!(refused("source", None).contains("source_change, change_setting"));
        assert!(refused("power_on", Some("x")).contains("takes no value"));
        assert!(refused("av_mute", None).contains("on or off"));
        assert!(refused("av_mute", Some("maybe")).contains("\"maybe\""));
        assert!(refused("source_change", None).contains("two hex digits"));
        let e = refused("source_change", Some("zz"));
        assert!(e.starts_with("source_change zz:"), "{e}");
        assert!(refused("change_setting", None).contains("NAME=VALUE"));
    }

    #[test]
    fn the_devices_table_shows_status_by_its_wire_names() {
        use super::StatusCells;
        use epmc_proto::bounded::{BoundedVec, HexCode};
        use epmc_proto::model::{Alarm, DeviceStatus, PowerState, SourceRef, Warning};
        let none = StatusCells::of(None);
        assert_eq!(
            [none.power, none.source, none.av_mute, none.state],
            ["-", "-", "-", "-"]
        );
        let mut status = DeviceStatus {
            power: Some(PowerState::StandbyNetworkOn),
            source: Some(SourceRef {
                code: HexCode::new(0xA0),
                name: None,
            }),
            av_mute: Some(true),
            ..Default::default()
        };
        let cells = StatusCells::of(Some(&status));
        assert_eq!(
            [cells.power, cells.source, cells.av_mute, cells.state],
            ["standby_network_on", "A0", "on", "ok"]
        );
        status.source = Some(SourceRef {
            code: HexCode::new(0x30),
            name: Some("HDMI\t1".try_into().expect("name")),
        });
        status.error_code = Some(HexCode::new(0x04));
        status.warnings = Some(BoundedVec::new(vec![Warning::AirFilter]).expect("warnings"));
        status.alarms = Some(BoundedVec::new(vec![Alarm::HighTemperature]).expect("alarms"));
        let cells = StatusCells::of(Some(&status));
        assert_eq!(
            cells.source, "HDMI\\t1",
            "a name from the network is escaped"
        );
        assert_eq!(cells.state, "error 04, air_filter, ALARM high_temperature");
    }

    #[test]
    fn a_cell_keeps_text_and_escapes_control_characters() {
        assert_eq!(one_line("Room 1 – Beamer"), "Room 1 – Beamer");
        assert_eq!(one_line("a\tb\nc\u{1b}[31mred"), "a\\tb\\nc\\u{1b}[31mred");
    }
}
