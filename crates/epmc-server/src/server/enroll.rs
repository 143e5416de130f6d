//! The HTTPS enrollment endpoint: an agent trades a one-time token and a certificate request
//! for a certificate from the server's CA.
//!
//! - `GET /api/v1/ca` returns the CA certificate (PEM). An agent fetches it without trusting
//!   it, checks its SHA-256 against the fingerprint its token carries, and from then on trusts
//!   only that CA (as `kubeadm join --discovery-token-ca-cert-hash` does). The HTTPS server
//!   presents its certificate together with the CA's, so the agent can also check the chain
//!   against the token in the same handshake.
//! - `POST /api/v1/enroll` with `{"token": "...", "csr": "-----BEGIN CERTIFICATE REQUEST-----…",
//!   "name": "optional"}` returns `{"agent_id", "certificate", "ca", "mqtt_port"}`. The server
//!   chooses the agent id; only the request's public key is used. A token for another CA, an
//!   unknown, used or expired token, and a bad request are refused with a message, and a
//!   refused token is recorded as a security event with the peer's address (at a bounded
//!   rate, see [`super::SecurityEventLimit`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use epmc_proto::bounded::Timestamp;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{Pki, SecurityLog, ServeError};
use crate::ca::{self, EnrollmentToken};
use crate::store::{Store, StoreError};

/// The enrollment request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The token string `epmc1.<id>.<secret>.<ca-sha256>`.
    pub token: String,
    /// The agent's PEM certificate request.
    pub csr: String,
    /// A name for the agent (defaults to its id).
    #[serde(default)]
    pub name: Option<String>,
}

/// The enrollment answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The agent id the server chose (the certificate's CN and the MQTT client id).
    pub agent_id: String,
    /// The agent's certificate, PEM.
    pub certificate: String,
    /// The CA certificate, PEM.
    pub ca: String,
    /// The port agents connect to (MQTT over TLS).
    pub mqtt_port: u16,
}

struct App {
    pki: Arc<Pki>,
    store: Store,
    security: Arc<SecurityLog>,
    mqtt_port: u16,
}

type Refusal = (StatusCode, String);

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    (status, message.into())
}

async fn get_ca(State(app): State<Arc<App>>) -> String {
    app.pki.ca.cert_pem()
}

async fn enroll(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>, Refusal> {
    let token = EnrollmentToken::parse(&req.token)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("token: {e}")))?;
    if let Err(e) = token.verify_ca(app.pki.ca.cert_der()) {
        record(&app, peer, "enroll_wrong_ca", &e.to_string()).await;
        return Err(refuse(StatusCode::BAD_REQUEST, format!("token: {e}")));
    }
    // Check the request before using the token, so a bad request costs no token.
    ca::verify_csr(req.csr.as_bytes())
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("csr: {e}")))?;
    let name = req.name.as_deref().unwrap_or("").trim();
    if name.len() > 128 || name.chars().any(char::is_control) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "name: at most 128 characters, no control characters",
        ));
    }
    let enrollment = app.store.enrollment();
    let tenant = match enrollment
        .consume_token_hash(&token.secret_hash().to_hex(), Timestamp::now())
        .await
    {
        Ok(t) => t,
        Err(StoreError::TokenRefused) => {
            record(
                &app,
                peer,
                "enroll_token_refused",
                &format!("token id {}", token.id()),
            )
            .await;
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "token refused: unknown, already used, or expired",
            ));
        }
        Err(e) => return Err(internal(e)),
    };
    let agent = enrollment
        .create_agent(tenant, name)
        .await
        .map_err(internal)?;
    let issued = app
        .pki
        .ca
        .sign_csr(req.csr.as_bytes(), agent.uuid(), OffsetDateTime::now_utc())
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("csr: {e}")))?;
    let not_after = Timestamp::from_unix(issued.not_after.unix_timestamp())
        .map_err(|e| internal(format!("certificate end of validity: {e}")))?;
    enrollment
        .record_certificate(agent, &issued.serial.to_hex(), not_after)
        .await
        .map_err(internal)?;
    tracing::info!(%agent, %tenant, "agent enrolled");
    Ok(Json(EnrollResponse {
        agent_id: agent.to_string(),
        certificate: issued.pem,
        ca: app.pki.ca.cert_pem(),
        mqtt_port: app.mqtt_port,
    }))
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "enrollment failed");
    refuse(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the server log",
    )
}

async fn record(app: &App, peer: SocketAddr, kind: &str, detail: &str) {
    app.security
        .record(kind, None, Some(&peer.to_string()), detail)
        .await;
}

/// Starts the HTTPS listener with the enrollment routes and `more` (the update routes);
/// returns its handle and address.
pub(super) async fn serve(
    addr: SocketAddr,
    pki: Arc<Pki>,
    store: Store,
    security: Arc<SecurityLog>,
    mqtt_port: u16,
    more: Router,
) -> Result<(axum_server::Handle<SocketAddr>, SocketAddr), ServeError> {
    let key = pki.key()?;
    let mut config = rustls::ServerConfig::builder_with_provider(ca::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ServeError::Pki(format!("HTTPS TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(pki.server_chain.clone(), key)
        .map_err(|e| ServeError::Pki(format!("HTTPS TLS: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let app = Arc::new(App {
        pki,
        store,
        security,
        mqtt_port,
    });
    let router = Router::new()
        .route("/api/v1/ca", get(get_ca))
        .route("/api/v1/enroll", post(enroll))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(app)
        .merge(more);
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ServeError::Bind { addr, source })?;
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config)),
    )
    .map_err(|source| ServeError::Bind { addr, source })?
    .handle(handle.clone());
    tokio::spawn(async move {
        if let Err(e) = server
            .serve(router.into_make_service_with_connect_info::<SocketAddr>())
            .await
        {
            tracing::error!(error = %e, "HTTPS listener stopped");
        }
    });
    Ok((handle, bound))
}
