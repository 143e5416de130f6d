//! Reading a projector over its HTTP control interface: the fallback collector where the
//! ESC/VP.net port (TCP 3629) is closed.
//!
//! `GET /cgi-bin/json_query?jsoncallback=CMD?` runs one ESC/VP21 query
//! (`escvp::http` decodes the reply); newer projectors protect it with HTTP Digest
//! authentication (RFC 7616, MD5 or SHA-256, user `EPSONWEB`) using the target's configured
//! password. [`HttpProjector`] reads the same items as the ESC/VP.net collector
//! ([`crate::collect`]) into the same `epmc-proto` messages ([`StatusRead`], [`Collected`]):
//! an item the projector refuses (`"error":true`) or that the interface does not expose
//! (`403`, as on models that whitelist commands) is absent (`None`) and listed in
//! [`Report::unsupported`], never zero.
//!
//! Failures are typed ([`HttpError`]): connection refused, unreachable, timeout, password
//! required (401 and no password configured), wrong password (401 after our answer), busy
//! (503), garbage (not HTTP, or not a json_query body), another HTTP status, connection
//! closed without an answer. Every request has a deadline; bodies are bounded
//! ([`MAX_BODY`]); the agent's HTTP proxy is never used for projectors.
//!
//! [`collect_fallback`] is what [`crate::collect::collect_once`] calls when port 3629 refuses
//! or closes the connection before the ESC/VP.net handshake.

use std::net::SocketAddr;
use std::time::Duration;

use epmc_proto::model::DeviceId;
use escvp::http::{Authorization, Challenge, DIGEST_USER, JsonQueryReply, json_query_target};
use escvp::net::Password;
use escvp::value::{Property, SourceList, WireValue};

use crate::collect::{
    CollectError, CollectOptions, Collected, Interface, Problem, Report, Stage, StatusRead,
};
use crate::config::{Endpoint, TargetMeta};

pub use crate::config::DEFAULT_HTTP_PORT;
/// Largest response body read (a json_query reply is well under 1 KiB).
pub const MAX_BODY: usize = 16 * 1024;
/// The ESC/VP21 deadline of a query, scaled by [`CollectOptions::command_timeout_scale`].
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the HTTP interface could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// Nothing listens on the HTTP port.
    #[error("HTTP connection refused")]
    Refused,
    /// The address cannot be reached.
    #[error("HTTP unreachable: {0}")]
    Unreachable(String),
    /// No answer in time.
    #[error("HTTP timed out during {0}")]
    TimedOut(Stage),
    /// `401` and no password is configured for the target.
    #[error("HTTP password required (401 Digest): configure the projector's web password")]
    PasswordRequired,
    /// `401` again after answering the Digest challenge: the password is wrong.
    #[error("HTTP wrong password (401 after the Digest answer)")]
    WrongPassword,
    /// `503`: the projector is busy.
    #[error("HTTP busy (503)")]
    Busy,
    /// The peer did not answer in HTTP, or not with a json_query body.
    #[error("not a projector's json_query: {0}")]
    Garbage(String),
    /// An HTTP status this collector cannot use (e.g. 404: no json_query interface).
    #[error("HTTP status {0}")]
    Status(u16),
    /// Authentication this collector cannot do (e.g. Basic only, or an unknown algorithm).
    #[error("HTTP authentication not supported: {0}")]
    UnsupportedAuth(String),
    /// The connection closed without a complete answer.
    #[error("HTTP connection closed without an answer")]
    Dropped,
    /// The HTTP client could not be set up.
    #[error("HTTP client: {0}")]
    Client(String),
}

impl HttpError {
    /// A short stable name: `http_refused`, `http_unreachable`, `http_timeout`,
    /// `http_password_required`, `http_wrong_password`, `http_busy`, `http_garbage`,
    /// `http_status`, `http_unsupported_auth`, `http_dropped`, `http_client`.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::Refused => "http_refused",
            HttpError::Unreachable(_) => "http_unreachable",
            HttpError::TimedOut(_) => "http_timeout",
            HttpError::PasswordRequired => "http_password_required",
            HttpError::WrongPassword => "http_wrong_password",
            HttpError::Busy => "http_busy",
            HttpError::Garbage(_) => "http_garbage",
            HttpError::Status(_) => "http_status",
            HttpError::UnsupportedAuth(_) => "http_unsupported_auth",
            HttpError::Dropped => "http_dropped",
            HttpError::Client(_) => "http_client",
        }
    }

    /// Whether no HTTP server was reached at all (refused, unreachable, connect timeout):
    /// the attempt says nothing about the device.
    pub fn is_no_server(&self) -> bool {
        matches!(
            self,
            HttpError::Refused | HttpError::Unreachable(_) | HttpError::TimedOut(Stage::Connect)
        )
    }

    fn from_reqwest(e: &reqwest::Error, command: &'static str) -> HttpError {
        // Walk the source chain for the I/O or HTTP-parse error underneath.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => HttpError::Refused,
                    std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
                        if !e.is_connect() =>
                    {
                        HttpError::Dropped
                    }
                    std::io::ErrorKind::TimedOut if e.is_connect() => {
                        HttpError::TimedOut(Stage::Connect)
                    }
                    _ if e.is_connect() => HttpError::Unreachable(io.to_string()),
                    _ => HttpError::Dropped,
                };
            }
            if let Some(h) = s.downcast_ref::<hyper::Error>() {
                if h.is_parse() || h.is_parse_status() {
                    return HttpError::Garbage(h.to_string());
                }
                if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                    return HttpError::Dropped;
                }
            }
            source = s.source();
        }
        if e.is_timeout() {
            if e.is_connect() {
                HttpError::TimedOut(Stage::Connect)
            } else {
                HttpError::TimedOut(Stage::Command(command))
            }
        } else if e.is_connect() {
            HttpError::Unreachable(e.to_string())
        } else {
            HttpError::Dropped
        }
    }
}

/// What a query answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryAnswer {
    /// The reply text.
    Value(String),
    /// The projector answered `ERR` (`"error":true`): unsupported or not now.
    Refused,
    /// `403`: the interface does not expose this command.
    Forbidden,
}

#[derive(Clone, Debug)]
struct DigestState {
    challenge: Challenge,
    cnonce: String,
    nc: u32,
}

type Step<T> = Result<Option<T>, HttpError>;

/// A projector's HTTP control interface. Requests go out one at a time (`&mut self`), on a
/// kept-alive connection; the Digest challenge is kept and answered pre-emptively with an
/// increasing nonce count, so a query costs one round trip.
#[derive(Debug)]
pub struct HttpProjector {
    client: reqwest::Client,
    base: String,
    addr: SocketAddr,
    password: Option<Password>,
    query_timeout: Duration,
    auth: Option<DigestState>,
    serial: Option<String>,
    sources: Option<SourceList>,
}

impl HttpProjector {
    /// Prepares a client for the projector's HTTP interface at `addr` (no I/O yet). The
    /// password is the Digest password (user `EPSONWEB`).
    pub fn new(
        addr: SocketAddr,
        password: Option<Password>,
        options: &CollectOptions,
    ) -> Result<HttpProjector, HttpError> {
        let scale = options.command_timeout_scale;
        let scale = if scale.is_finite() {
            scale.clamp(0.01, 100.0)
        } else {
            1.0
        };
        let query_timeout = QUERY_TIMEOUT.mul_f64(scale);
        let client = reqwest::Client::builder()
            // Projectors are on the LAN: never through the agent's (or the environment's)
            // HTTP proxy.
            .no_proxy()
            // Plain http:// only: no TLS roots to load (loading the platform's roots costs
            // more than a whole projector read).
            .tls_certs_only(std::iter::empty())
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(options.connect_timeout)
            .pool_max_idle_per_host(1)
            .tcp_nodelay(true)
            .user_agent(concat!("epmc-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HttpError::Client(e.to_string()))?;
        Ok(HttpProjector {
            client,
            base: format!("http://{addr}"),
            addr,
            password,
            query_timeout,
            auth: None,
            serial: None,
            sources: None,
        })
    }

    /// For an endpoint: its address with the HTTP port, and its password.
    pub fn for_endpoint(
        endpoint: &Endpoint,
        http_port: u16,
        options: &CollectOptions,
    ) -> Result<HttpProjector, HttpError> {
        HttpProjector::new(
            SocketAddr::new(endpoint.addr.ip(), http_port),
            endpoint.password.clone(),
            options,
        )
    }

    /// Where the interface is reached.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The serial number, once read.
    pub fn serial(&self) -> Option<&str> {
        self.serial.as_deref()
    }

    /// The device id: the serial number when known, `ip:ADDR` otherwise.
    pub fn device_id(&self) -> DeviceId {
        crate::collect::device_id(self.serial.as_deref(), self.addr)
    }

    fn authorization(&mut self, target: &str) -> Option<String> {
        let password = self.password.as_ref()?;
        let state = self.auth.as_mut()?;
        state.nc = state.nc.wrapping_add(1);
        Some(
            Authorization::respond(
                &state.challenge,
                DIGEST_USER,
                password.as_str(),
                "GET",
                target,
                &state.cnonce,
                state.nc,
            )
            .to_header(),
        )
    }

    /// Runs one query, e.g. `query("PWR")`, answering a Digest challenge when asked.
    pub async fn query(&mut self, command: &'static str) -> Result<QueryAnswer, HttpError> {
        let target = json_query_target(command)
            .ok_or_else(|| HttpError::Client(format!("{command:?} is not a command name")))?;
        let url = format!("{}{target}", self.base);
        // At most: one try, one answer to a fresh challenge, one to a stale-nonce challenge.
        for _ in 0..3 {
            let had_auth = self.auth.is_some() && self.password.is_some();
            let mut request = self
                .client
                .get(&url)
                .header("Referer", format!("{}/cgi-bin/webconf", self.base))
                .header("Accept", "application/json, text/javascript");
            if let Some(a) = self.authorization(&target) {
                request = request.header("Authorization", a);
            }
            let exchange = async {
                let mut response = request
                    .send()
                    .await
                    .map_err(|e| HttpError::from_reqwest(&e, command))?;
                let status = response.status().as_u16();
                let challenges: Vec<String> = response
                    .headers()
                    .get_all("www-authenticate")
                    .iter()
                    .filter_map(|v| v.to_str().ok().map(str::to_owned))
                    .collect();
                let mut body = Vec::new();
                if status == 200 {
                    while let Some(chunk) = response
                        .chunk()
                        .await
                        .map_err(|e| HttpError::from_reqwest(&e, command))?
                    {
                        if body.len() + chunk.len() > MAX_BODY {
                            return Err(HttpError::Garbage(format!(
                                "response body over {MAX_BODY} bytes"
                            )));
                        }
                        body.extend_from_slice(&chunk);
                    }
                }
                Ok((status, challenges, body))
            };
            let (status, challenges, body) = tokio::time::timeout(self.query_timeout, exchange)
                .await
                .map_err(|_| HttpError::TimedOut(Stage::Command(command)))??;
            match status {
                200 => return parse_answer(command, &body),
                401 => {
                    let mut offered = Vec::new();
                    for c in &challenges {
                        offered.extend(
                            Challenge::parse_header(c).map_err(|e| {
                                HttpError::Garbage(format!("WWW-Authenticate: {e}"))
                            })?,
                        );
                    }
                    let Some(best) = offered.into_iter().max_by_key(|c| c.algorithm().strength())
                    else {
                        return Err(HttpError::UnsupportedAuth(if challenges.is_empty() {
                            "401 without a challenge".to_owned()
                        } else {
                            challenges.join("; ")
                        }));
                    };
                    if self.password.is_none() {
                        return Err(HttpError::PasswordRequired);
                    }
                    if had_auth && !best.is_stale() {
                        self.auth = None;
                        return Err(HttpError::WrongPassword);
                    }
                    self.auth = Some(DigestState {
                        challenge: best,
                        cnonce: cnonce()?,
                        nc: 0,
                    });
                }
                403 => return Ok(QueryAnswer::Forbidden),
                503 => return Err(HttpError::Busy),
                other => return Err(HttpError::Status(other)),
            }
        }
        Err(HttpError::WrongPassword)
    }

    async fn get<P: Property>(&mut self, report: &mut Report) -> Step<P::Value> {
        match self.query(P::NAME).await? {
            QueryAnswer::Value(v) => match P::Value::parse_value(&v) {
                Ok(value) => Ok(Some(value)),
                Err(e) => {
                    report.problems.push(Problem {
                        command: P::NAME,
                        reason: e.to_string(),
                    });
                    Ok(None)
                }
            },
            QueryAnswer::Refused | QueryAnswer::Forbidden => {
                report.unsupported.push(P::NAME);
                Ok(None)
            }
        }
    }

    /// Reads the serial number once (the device id).
    pub async fn identify(&mut self, report: &mut Report) -> Result<DeviceId, HttpError> {
        crate::collect::identify(self, report).await
    }

    /// Reads the status items (and the serial number, if not read yet), as
    /// [`crate::collect::Projector::read_status`] does over ESC/VP.net.
    pub async fn read_status(&mut self) -> Result<StatusRead, HttpError> {
        crate::collect::read_status(self).await
    }

    /// Reads everything, as [`crate::collect::Projector::read_full`] does over ESC/VP.net.
    pub async fn read_full(&mut self, meta: &TargetMeta) -> Result<Collected, HttpError> {
        crate::collect::read_full(self, meta).await
    }
}

impl crate::collect::Items for HttpProjector {
    type Error = HttpError;
    async fn get<P: Property>(&mut self, report: &mut Report) -> Step<P::Value> {
        HttpProjector::get::<P>(self, report).await
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn via(&self) -> Interface {
        Interface::Http
    }
    fn serial_mut(&mut self) -> &mut Option<String> {
        &mut self.serial
    }
    fn sources_mut(&mut self) -> &mut Option<SourceList> {
        &mut self.sources
    }
}

fn parse_answer(command: &'static str, body: &[u8]) -> Result<QueryAnswer, HttpError> {
    let reply = JsonQueryReply::parse(body).map_err(|e| HttpError::Garbage(e.to_string()))?;
    let asked = format!("{command}?");
    if !reply.query().is_empty() && !reply.query().eq_ignore_ascii_case(&asked) {
        return Err(HttpError::Garbage(format!(
            "asked {asked}, the answer is for {:?}",
            reply.query()
        )));
    }
    if reply.is_error() {
        return Ok(QueryAnswer::Refused);
    }
    Ok(QueryAnswer::Value(reply.reply().to_owned()))
}

fn cnonce() -> Result<String, HttpError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| HttpError::Client(format!("no randomness: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads the status items over HTTP, within [`CollectOptions::deadline`] (for a service loop
/// whose ESC/VP.net connection [`fallback_applies`]).
pub async fn status_http(
    endpoint: &Endpoint,
    http_port: u16,
    options: &CollectOptions,
) -> Result<StatusRead, HttpError> {
    let work = async {
        let mut projector = HttpProjector::for_endpoint(endpoint, http_port, options)?;
        projector.read_status().await
    };
    tokio::time::timeout(options.deadline, work)
        .await
        .unwrap_or(Err(HttpError::TimedOut(Stage::Deadline)))
}

/// Reads everything over HTTP, within [`CollectOptions::deadline`].
pub async fn collect_http(
    endpoint: &Endpoint,
    http_port: u16,
    options: &CollectOptions,
) -> Result<Collected, HttpError> {
    let work = async {
        let mut projector = HttpProjector::for_endpoint(endpoint, http_port, options)?;
        projector.read_full(&endpoint.meta).await
    };
    tokio::time::timeout(options.deadline, work)
        .await
        .unwrap_or(Err(HttpError::TimedOut(Stage::Deadline)))
}

/// Whether an ESC/VP.net connection failure calls for the HTTP fallback: the port refused
/// the connection, closed it before the handshake reply (the host is up, but ESC/VP.net is
/// not served there), or answered `0x45` (request not allowed: command communication set to
/// "Protected", which refuses ESC/VP.net 1.0). Timeouts, busy and password refusals do not.
pub fn fallback_applies(tcp_error: &CollectError) -> bool {
    matches!(
        tcp_error,
        CollectError::Refused | CollectError::Dropped | CollectError::NotAllowed
    )
}

/// The fallback: after `tcp_error` on port 3629, reads the endpoint over HTTP (its
/// [`Endpoint::http_port`]). If no HTTP server answers either (or the endpoint has no HTTP
/// port), the ESC/VP.net error is returned unchanged; if one answers but the read fails,
/// the HTTP error is returned ([`CollectError::Http`]).
pub async fn collect_fallback(
    endpoint: &Endpoint,
    options: &CollectOptions,
    tcp_error: CollectError,
) -> Result<Collected, CollectError> {
    let Some(port) = endpoint.http_port else {
        return Err(tcp_error);
    };
    tracing::debug!(addr = %endpoint.addr, %tcp_error, port, "ESC/VP.net unavailable; trying HTTP");
    match collect_http(endpoint, port, options).await {
        Ok(c) => Ok(c),
        Err(e) if e.is_no_server() => Err(tcp_error),
        Err(e) => Err(CollectError::Http(e)),
    }
}
