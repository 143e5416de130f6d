//! The projector's HTTP control interface, sans I/O (feature `http`).
//!
//! Epson projectors also answer ESC/VP21 queries over HTTP:
//! `GET /cgi-bin/json_query?jsoncallback=PWR?` returns
//! `{"projector":{"feature":{"name":"esc/vp21","query":"PWR?","reply":"04","error":false}}}`,
//! and `"reply":"ERR","error":true` where the projector refuses the command. Newer models
//! protect it with HTTP Digest authentication (user [`DIGEST_USER`], the Web Control
//! password). This module holds what both ends need and does no I/O:
//!
//! - [`json_query_target`] builds the request target, [`JsonQueryReply`] decodes and encodes
//!   the reply body;
//! - [`Challenge`] (the `WWW-Authenticate: Digest …` header) and [`Authorization`] (the
//!   `Authorization: Digest …` header) parse and encode RFC 7616 Digest headers with MD5,
//!   MD5-sess, SHA-256 and SHA-256-sess, `qop=auth` (and the RFC 2069 form without `qop` that
//!   old devices use); [`Authorization::respond`] computes a client's answer and
//!   [`Authorization::verify`] checks one on the server side.
//!
//! Parsers are bounded ([`MAX_HEADER_LEN`], [`MAX_PARAMS`]) and return errors, never panic.
//!
//! ```
//! use escvp::http::{Authorization, Challenge, DigestAlgorithm, DIGEST_USER};
//!
//! let challenge = Challenge::new("EPSONWEB", "abc123", DigestAlgorithm::Sha256);
//! let header = challenge.to_header();
//! let parsed = Challenge::parse_header(&header)?;
//! assert_eq!(parsed, vec![challenge.clone()]);
//! let auth = Authorization::respond(&parsed[0], DIGEST_USER, "secret", "GET",
//!     "/cgi-bin/json_query?jsoncallback=PWR?", "0a1b2c3d", 1);
//! let back = Authorization::parse(&auth.to_header())?;
//! assert!(back.verify("secret", "GET"));
//! assert!(!back.verify("wrong", "GET"));
//! # Ok::<(), escvp::http::HttpParseError>(())
//! ```

use core::fmt;
use std::fmt::Write as _;

use md5::Md5;
use sha2::{Digest, Sha256};

/// The Digest user name Epson projectors expect.
pub const DIGEST_USER: &str = "EPSONWEB";
/// Path of the query interface.
pub const JSON_QUERY_PATH: &str = "/cgi-bin/json_query";
/// Path of the set interface (`directsend?CMD=VALUE`).
pub const DIRECTSEND_PATH: &str = "/cgi-bin/directsend";
/// Longest `WWW-Authenticate` or `Authorization` header value the parsers accept.
pub const MAX_HEADER_LEN: usize = 4096;
/// Most parameters one challenge or authorization may carry.
pub const MAX_PARAMS: usize = 32;
/// Longest `reply` text accepted in a json_query body.
pub const MAX_REPLY_LEN: usize = 4096;

/// What is wrong with an HTTP header or body from the other end.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpParseError {
    /// Longer than the parser accepts.
    #[error("{what} is longer than {max} bytes")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// Not the expected syntax.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// What was malformed.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// A required field is missing.
    #[error("{what} has no {field}")]
    Missing {
        /// The header or body.
        what: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// An algorithm or protection this implementation does not do.
    #[error("unsupported {what}: {value}")]
    Unsupported {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: String,
    },
}

fn malformed(what: &'static str, why: impl Into<String>) -> HttpParseError {
    HttpParseError::Malformed {
        what,
        why: why.into(),
    }
}

/// The request target of a json_query for `command` (e.g. `PWR`): `/cgi-bin/json_query?jsoncallback=PWR?`.
/// `None` if `command` is not an ESC/VP21 command name (1-16 ASCII letters and digits).
pub fn json_query_target(command: &str) -> Option<String> {
    let ok =
        (1..=16).contains(&command.len()) && command.bytes().all(|b| b.is_ascii_alphanumeric());
    ok.then(|| format!("{JSON_QUERY_PATH}?jsoncallback={command}?"))
}

/// The body of a json_query reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonQueryReply {
    query: String,
    reply: String,
    error: bool,
}

impl JsonQueryReply {
    /// A successful answer to `query` (e.g. `PWR?`).
    pub fn value(query: &str, reply: &str) -> JsonQueryReply {
        JsonQueryReply {
            query: query.to_owned(),
            reply: reply.to_owned(),
            error: false,
        }
    }

    /// The projector refused `query` (`"reply":"ERR","error":true`).
    pub fn refused(query: &str) -> JsonQueryReply {
        JsonQueryReply {
            query: query.to_owned(),
            reply: "ERR".to_owned(),
            error: true,
        }
    }

    /// The query it answers, e.g. `PWR?`.
    pub fn query(&self) -> &str {
        &self.query
    }

    /// The reply text (the value after `KEY=` on ESC/VP21, or `ERR`).
    pub fn reply(&self) -> &str {
        &self.reply
    }

    /// Whether the projector refused the command.
    pub fn is_error(&self) -> bool {
        self.error
    }

    /// Decodes a reply body. The JSON must have `projector.feature.reply` (a string) and
    /// `projector.feature.error` (a boolean); `query` is optional (empty when absent).
    pub fn parse(body: &[u8]) -> Result<JsonQueryReply, HttpParseError> {
        const WHAT: &str = "json_query reply";
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| malformed(WHAT, e.to_string()))?;
        let feature = value
            .get("projector")
            .and_then(|p| p.get("feature"))
            .ok_or(HttpParseError::Missing {
                what: WHAT,
                field: "projector.feature",
            })?;
        let reply = match feature.get("reply") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => return Err(malformed(WHAT, format!("reply is not a string: {other}"))),
            None => {
                return Err(HttpParseError::Missing {
                    what: WHAT,
                    field: "reply",
                });
            }
        };
        if reply.len() > MAX_REPLY_LEN {
            return Err(HttpParseError::TooLong {
                what: "json_query reply text",
                max: MAX_REPLY_LEN,
            });
        }
        let error = match feature.get("error") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => return Err(malformed(WHAT, format!("error is not a boolean: {other}"))),
            None => {
                return Err(HttpParseError::Missing {
                    what: WHAT,
                    field: "error",
                });
            }
        };
        let query = match feature.get("query") {
            Some(serde_json::Value::String(s)) => s.clone(),
            None | Some(serde_json::Value::Null) => String::new(),
            Some(other) => return Err(malformed(WHAT, format!("query is not a string: {other}"))),
        };
        Ok(JsonQueryReply {
            query,
            reply,
            error,
        })
    }

    /// Encodes the reply body.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "projector": {
                "feature": {
                    "name": "esc/vp21",
                    "query": self.query,
                    "reply": self.reply,
                    "error": self.error,
                }
            }
        })
        .to_string()
    }
}

/// A Digest hash algorithm (RFC 7616 §3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DigestAlgorithm {
    /// `MD5` (the default when a challenge names none).
    Md5,
    /// `MD5-sess`.
    Md5Sess,
    /// `SHA-256`.
    Sha256,
    /// `SHA-256-sess`.
    Sha256Sess,
}

impl DigestAlgorithm {
    /// The name in headers.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Md5 => "MD5",
            DigestAlgorithm::Md5Sess => "MD5-sess",
            DigestAlgorithm::Sha256 => "SHA-256",
            DigestAlgorithm::Sha256Sess => "SHA-256-sess",
        }
    }

    /// Parses a header name (case-insensitive).
    pub fn from_name(name: &str) -> Option<DigestAlgorithm> {
        [
            DigestAlgorithm::Md5,
            DigestAlgorithm::Md5Sess,
            DigestAlgorithm::Sha256,
            DigestAlgorithm::Sha256Sess,
        ]
        .into_iter()
        .find(|a| a.name().eq_ignore_ascii_case(name))
    }

    /// How strong it is, to pick among several challenges: SHA-256 over MD5.
    pub fn strength(self) -> u8 {
        match self {
            DigestAlgorithm::Md5 | DigestAlgorithm::Md5Sess => 1,
            DigestAlgorithm::Sha256 | DigestAlgorithm::Sha256Sess => 2,
        }
    }

    fn is_sess(self) -> bool {
        matches!(self, DigestAlgorithm::Md5Sess | DigestAlgorithm::Sha256Sess)
    }

    /// The lower-case hex hash of `data`.
    pub fn hash_hex(self, data: &str) -> String {
        match self {
            DigestAlgorithm::Md5 | DigestAlgorithm::Md5Sess => hex(&Md5::digest(data.as_bytes())),
            DigestAlgorithm::Sha256 | DigestAlgorithm::Sha256Sess => {
                hex(&Sha256::digest(data.as_bytes()))
            }
        }
    }
}

impl fmt::Display for DigestAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A `WWW-Authenticate: Digest …` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    realm: String,
    nonce: String,
    opaque: Option<String>,
    algorithm: DigestAlgorithm,
    /// `qop="auth"` offered (otherwise the RFC 2069 form).
    qop_auth: bool,
    stale: bool,
}

impl Challenge {
    /// A challenge with `qop="auth"`, no opaque value, not stale.
    pub fn new(realm: &str, nonce: &str, algorithm: DigestAlgorithm) -> Challenge {
        Challenge {
            realm: realm.to_owned(),
            nonce: nonce.to_owned(),
            opaque: None,
            algorithm,
            qop_auth: true,
            stale: false,
        }
    }

    /// Marks the challenge stale (the client's nonce expired; its password was right).
    pub fn with_stale(mut self, stale: bool) -> Challenge {
        self.stale = stale;
        self
    }

    /// Sets the opaque value.
    pub fn with_opaque(mut self, opaque: &str) -> Challenge {
        self.opaque = Some(opaque.to_owned());
        self
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The nonce.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// The algorithm.
    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    /// Whether the server said the previous nonce was stale.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Whether the server offered `qop="auth"`.
    pub fn offers_qop_auth(&self) -> bool {
        self.qop_auth
    }

    /// The header value (`Digest realm="…", …`).
    pub fn to_header(&self) -> String {
        let mut h = format!(
            "Digest realm={}, nonce={}, algorithm={}",
            quote(&self.realm),
            quote(&self.nonce),
            self.algorithm
        );
        if self.qop_auth {
            h.push_str(", qop=\"auth\"");
        }
        if let Some(o) = &self.opaque {
            let _ = write!(h, ", opaque={}", quote(o));
        }
        if self.stale {
            h.push_str(", stale=true");
        }
        h
    }

    /// Parses one `WWW-Authenticate` header value, which may hold several challenges, and
    /// returns its Digest challenges that this implementation can answer (other schemes,
    /// unknown algorithms and challenges offering only `qop=auth-int` are skipped). An empty
    /// list means no usable Digest challenge.
    pub fn parse_header(value: &str) -> Result<Vec<Challenge>, HttpParseError> {
        const WHAT: &str = "WWW-Authenticate";
        let mut out = Vec::new();
        for (scheme, params) in parse_auth_header(value, WHAT)? {
            if !scheme.eq_ignore_ascii_case("Digest") {
                continue;
            }
            let get = |name: &str| {
                params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
            };
            let realm = get("realm").ok_or(HttpParseError::Missing {
                what: WHAT,
                field: "realm",
            })?;
            let nonce = get("nonce").ok_or(HttpParseError::Missing {
                what: WHAT,
                field: "nonce",
            })?;
            let Some(algorithm) = get("algorithm").map_or(Some(DigestAlgorithm::Md5), |a| {
                DigestAlgorithm::from_name(a)
            }) else {
                continue;
            };
            let qop_auth = match get("qop") {
                None => false,
                Some(q) => {
                    if !q.split(',').any(|o| o.trim().eq_ignore_ascii_case("auth")) {
                        continue; // auth-int only
                    }
                    true
                }
            };
            out.push(Challenge {
                realm: realm.to_owned(),
                nonce: nonce.to_owned(),
                opaque: get("opaque").map(str::to_owned),
                algorithm,
                qop_auth,
                stale: get("stale").is_some_and(|s| s.eq_ignore_ascii_case("true")),
            });
        }
        Ok(out)
    }
}

/// An `Authorization: Digest …` header.
#[derive(Clone, PartialEq, Eq)]
pub struct Authorization {
    username: String,
    realm: String,
    nonce: String,
    uri: String,
    algorithm: DigestAlgorithm,
    /// `(nc, cnonce)` when `qop=auth`.
    qop: Option<(u32, String)>,
    opaque: Option<String>,
    response: String,
}

impl fmt::Debug for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The response is password-derived; keep it out of logs.
        f.debug_struct("Authorization")
            .field("username", &self.username)
            .field("realm", &self.realm)
            .field("uri", &self.uri)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Authorization {
    /// Answers `challenge` for `method` and `uri` (the request target), with client nonce
    /// `cnonce` and nonce count `nc` (1 for the first use of this nonce).
    pub fn respond(
        challenge: &Challenge,
        username: &str,
        password: &str,
        method: &str,
        uri: &str,
        cnonce: &str,
        nc: u32,
    ) -> Authorization {
        let mut auth = Authorization {
            username: username.to_owned(),
            realm: challenge.realm.clone(),
            nonce: challenge.nonce.clone(),
            uri: uri.to_owned(),
            algorithm: challenge.algorithm,
            qop: challenge.qop_auth.then(|| (nc, cnonce.to_owned())),
            opaque: challenge.opaque.clone(),
            response: String::new(),
        };
        auth.response = auth.expected_response(password, method);
        auth
    }

    fn expected_response(&self, password: &str, method: &str) -> String {
        let alg = self.algorithm;
        let mut ha1 = alg.hash_hex(&format!("{}:{}:{}", self.username, self.realm, password));
        if alg.is_sess() {
            let cnonce = self.qop.as_ref().map_or("", |(_, c)| c.as_str());
            ha1 = alg.hash_hex(&format!("{ha1}:{}:{cnonce}", self.nonce));
        }
        let ha2 = alg.hash_hex(&format!("{method}:{}", self.uri));
        match &self.qop {
            Some((nc, cnonce)) => alg.hash_hex(&format!(
                "{ha1}:{}:{nc:08x}:{cnonce}:auth:{ha2}",
                self.nonce
            )),
            None => alg.hash_hex(&format!("{ha1}:{}:{ha2}", self.nonce)),
        }
    }

    /// Whether the response matches `password` for `method` (constant-time comparison).
    /// The caller also checks [`Self::nonce`], [`Self::realm`], [`Self::uri`] and
    /// [`Self::username`] against what it expects.
    pub fn verify(&self, password: &str, method: &str) -> bool {
        let expected = self.expected_response(password, method);
        let (a, b) = (expected.as_bytes(), self.response.to_ascii_lowercase());
        let b = b.as_bytes();
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The user name.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The nonce it answers.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// The request target it was computed for.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The algorithm.
    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    /// The nonce count, when `qop=auth`.
    pub fn nonce_count(&self) -> Option<u32> {
        self.qop.as_ref().map(|(nc, _)| *nc)
    }

    /// The header value (`Digest username="…", …`).
    pub fn to_header(&self) -> String {
        let mut h = format!(
            "Digest username={}, realm={}, nonce={}, uri={}, algorithm={}, response={}",
            quote(&self.username),
            quote(&self.realm),
            quote(&self.nonce),
            quote(&self.uri),
            self.algorithm,
            quote(&self.response)
        );
        if let Some((nc, cnonce)) = &self.qop {
            let _ = write!(h, ", qop=auth, nc={nc:08x}, cnonce={}", quote(cnonce));
        }
        if let Some(o) = &self.opaque {
            let _ = write!(h, ", opaque={}", quote(o));
        }
        h
    }

    /// Parses an `Authorization` header value (server side).
    pub fn parse(value: &str) -> Result<Authorization, HttpParseError> {
        const WHAT: &str = "Authorization";
        let mut challenges = parse_auth_header(value, WHAT)?;
        if challenges.len() != 1 {
            return Err(malformed(WHAT, "expected exactly one credential"));
        }
        let (scheme, params) = challenges.remove(0);
        if !scheme.eq_ignore_ascii_case("Digest") {
            return Err(HttpParseError::Unsupported {
                what: "authorization scheme",
                value: scheme,
            });
        }
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let need =
            |field: &'static str| get(field).ok_or(HttpParseError::Missing { what: WHAT, field });
        let algorithm = match get("algorithm") {
            None => DigestAlgorithm::Md5,
            Some(a) => DigestAlgorithm::from_name(&a).ok_or(HttpParseError::Unsupported {
                what: "algorithm",
                value: a,
            })?,
        };
        let qop = match get("qop") {
            None => None,
            Some(q) if q.eq_ignore_ascii_case("auth") => {
                let nc = need("nc")?;
                if nc.len() != 8 {
                    return Err(malformed(WHAT, "nc is not 8 hex digits"));
                }
                let nc = u32::from_str_radix(&nc, 16)
                    .map_err(|_| malformed(WHAT, "nc is not 8 hex digits"))?;
                Some((nc, need("cnonce")?))
            }
            Some(q) => {
                return Err(HttpParseError::Unsupported {
                    what: "qop",
                    value: q,
                });
            }
        };
        Ok(Authorization {
            username: need("username")?,
            realm: need("realm")?,
            nonce: need("nonce")?,
            uri: need("uri")?,
            algorithm,
            qop,
            opaque: get("opaque"),
            response: need("response")?,
        })
    }
}

type AuthParams = Vec<(String, String)>;

/// Splits an authentication header value into `(scheme, params)` items (RFC 7235 §2.1,
/// without token68 forms).
fn parse_auth_header(
    value: &str,
    what: &'static str,
) -> Result<Vec<(String, AuthParams)>, HttpParseError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(HttpParseError::TooLong {
            what,
            max: MAX_HEADER_LEN,
        });
    }
    let b = value.as_bytes();
    let mut i = 0;
    let mut out: Vec<(String, AuthParams)> = Vec::new();
    let mut count = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> Option<String> {
        let start = *i;
        while *i < b.len() && is_tchar(b[*i]) {
            *i += 1;
        }
        (*i > start).then(|| value[start..*i].to_owned())
    };
    loop {
        // Skip list separators between challenges.
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t' || b[i] == b',') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let Some(scheme) = token(&mut i) else {
            return Err(malformed(what, format!("unexpected character at byte {i}")));
        };
        let mut params: AuthParams = Vec::new();
        loop {
            // Between params: whitespace and commas.
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t' || b[i] == b',') {
                i += 1;
            }
            if i >= b.len() {
                break;
            }
            let name_start = i;
            let Some(name) = token(&mut i) else {
                return Err(malformed(what, format!("unexpected character at byte {i}")));
            };
            let mut j = i;
            skip_ws(&mut j);
            if j >= b.len() || b[j] != b'=' {
                // A token not followed by `=`: the next challenge's scheme.
                i = name_start;
                break;
            }
            i = j + 1;
            skip_ws(&mut i);
            let v = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut s = String::new();
                loop {
                    match b.get(i) {
                        None => return Err(malformed(what, "unterminated quoted string")),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            let Some(&c) = b.get(i + 1) else {
                                return Err(malformed(what, "unterminated quoted string"));
                            };
                            // quoted-pair = "\" ( HTAB / SP / VCHAR ): never a control character.
                            if !(c == b'\t' || (0x20..0x7f).contains(&c)) {
                                return Err(malformed(
                                    what,
                                    "control or non-ASCII character escaped in a quoted string",
                                ));
                            }
                            s.push(c as char);
                            i += 2;
                        }
                        Some(&c) if c.is_ascii() && c != 0x7f && (c >= 0x20 || c == b'\t') => {
                            s.push(c as char);
                            i += 1;
                        }
                        Some(_) => {
                            return Err(malformed(
                                what,
                                "control or non-ASCII character in a quoted string",
                            ));
                        }
                    }
                }
                s
            } else {
                token(&mut i).ok_or_else(|| malformed(what, format!("{name} has no value")))?
            };
            count += 1;
            if count > MAX_PARAMS {
                return Err(HttpParseError::TooLong {
                    what: "authentication parameter list",
                    max: MAX_PARAMS,
                });
            }
            params.push((name, v));
            skip_ws(&mut i);
            match b.get(i) {
                None => break,
                Some(b',') => {}
                Some(_) => {
                    return Err(malformed(what, format!("expected `,` at byte {i}")));
                }
            }
        }
        out.push((scheme, params));
        if out.len() > MAX_PARAMS {
            return Err(HttpParseError::TooLong {
                what: "challenge list",
                max: MAX_PARAMS,
            });
        }
    }
    Ok(out)
}

/// A quoted-string: `"` and `\` escaped with `\`; control characters (which a header
/// cannot carry) become `_`.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            // HTAB is quoted-string text (RFC 9110 §5.6.4) and parses back; any other control
            // character (CR, LF: a header injection) cannot be written.
            '\t' => q.push('\t'),
            c if c.is_control() => q.push('_'),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7616 §3.9.1: the worked example for MD5 and SHA-256 (user Mufasa, password
    /// "Circle of Life").
    #[test]
    fn a_tab_inside_a_quoted_value_is_written_back() {
        // Found by the escvp_http fuzz target: the writer turned the tab into `_`.
        let header = "Digest realm=\"EPSON\", nonce=\"n\", qop=\"auth\", opaque=\"x\ty\"";
        let c = Challenge::parse_header(header).unwrap();
        assert_eq!(c[0].to_header().matches('\t').count(), 1);
        assert_eq!(Challenge::parse_header(&c[0].to_header()).unwrap(), c);
        // An escaped control character is refused (found by the fuzz target too).
        assert!(Challenge::parse_header("Digest realm=\"a\\\0b\", nonce=\"n\"").is_err());
        assert!(Challenge::parse_header("Digest realm=\"a\\\r\\\nb\", nonce=\"n\"").is_err());
        // Other control characters are never written (no header injection).
        let odd = Challenge::new("a\r\nX-Injected: 1", "n", DigestAlgorithm::Md5);
        assert!(!odd.to_header().contains(['\r', '\n']));
    }

    #[test]
    fn rfc7616_examples() {
        for (alg, expected) in [
            (DigestAlgorithm::Md5, "8ca523f5e9506fed4657c9700eebdbec"),
            (
                DigestAlgorithm::Sha256,
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
        ] {
            let challenge = Challenge {
                realm: "http-auth@example.org".into(),
                nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v".into(),
                opaque: Some("FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS".into()),
                algorithm: alg,
                qop_auth: true,
                stale: false,
            };
            let auth = Authorization::respond(
                &challenge,
                "Mufasa",
                "Circle of Life",
                "GET",
                "/dir/index.html",
                "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
                1,
            );
            assert_eq!(auth.response, expected, "{alg}");
            assert!(auth.verify("Circle of Life", "GET"));
            assert!(!auth.verify("Circle of life", "GET"));
            assert!(!auth.verify("Circle of Life", "POST"));
        }
    }

    /// RFC 2617 §3.5 example (MD5, qop=auth), and the RFC 2069 form without qop.
    #[test]
    fn rfc2617_example_and_no_qop() {
        let header = r#"Digest realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#;
        let c = Challenge::parse_header(header).expect("parses");
        assert_eq!(c.len(), 1);
        let auth = Authorization::respond(
            &c[0],
            "Mufasa",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            "0a4f113b",
            1,
        );
        assert_eq!(auth.response, "6629fae49393a05397450978507c4ef1");
        let parsed = Authorization::parse(&auth.to_header()).expect("parses");
        assert_eq!(parsed, auth);
        assert_eq!(parsed.nonce_count(), Some(1));

        let old = Challenge::parse_header(r#"Digest realm="r", nonce="n""#).expect("parses");
        assert!(!old[0].offers_qop_auth());
        let auth = Authorization::respond(&old[0], "u", "p", "GET", "/x", "c", 1);
        assert!(!auth.to_header().contains("qop"));
        assert!(
            Authorization::parse(&auth.to_header())
                .expect("parses")
                .verify("p", "GET")
        );
    }

    #[test]
    fn several_challenges_in_one_header() {
        let h = r#"Basic realm="x", Digest realm="a", nonce="1", algorithm=SHA-256, qop="auth", Digest realm="a", nonce="2", algorithm=MD5, qop="auth", Digest realm="a", nonce="3", algorithm=SHA-512-256"#;
        let c = Challenge::parse_header(h).expect("parses");
        let algs: Vec<_> = c
            .iter()
            .map(|c| (c.algorithm(), c.nonce().to_owned()))
            .collect();
        assert_eq!(
            algs,
            vec![
                (DigestAlgorithm::Sha256, "1".to_owned()),
                (DigestAlgorithm::Md5, "2".to_owned())
            ]
        );
        let stale =
            Challenge::parse_header(r#"Digest realm="a", nonce="9", stale=TRUE"#).expect("parses");
        assert!(stale[0].is_stale());
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        for bad in [
            "Digest realm=\"unterminated",
            "Digest realm=",
            "Digest realm=\"a\" nonce=\"b\"",
            "Digest realm=\"a\\",
            "=x",
            "Digest realm=\"a\u{7}\"",
        ] {
            assert!(Challenge::parse_header(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            Challenge::parse_header(&"a".repeat(MAX_HEADER_LEN + 1)),
            Err(HttpParseError::TooLong { .. })
        ));
        let many: Vec<String> = (0..40).map(|i| format!("p{i}=v")).collect();
        assert!(Challenge::parse_header(&format!("Digest {}", many.join(", "))).is_err());
        assert_eq!(
            Challenge::parse_header(r#"Digest nonce="n""#),
            Err(HttpParseError::Missing {
                what: "WWW-Authenticate",
                field: "realm"
            })
        );
        assert!(Authorization::parse("Basic dXNlcjpwdw==").is_err());
        assert!(Authorization::parse(r#"Digest username="u", realm="r", nonce="n", uri="/", response="x", qop=auth, nc=zz, cnonce="c""#).is_err());
        assert!(
            Authorization::parse(
                r#"Digest username="u", realm="r", nonce="n", uri="/", response="x", qop=auth-int"#
            )
            .is_err()
        );
    }

    #[test]
    fn quoted_strings_round_trip_and_injection_is_neutralised() {
        let c = Challenge::new("re\"alm", "no\\nce", DigestAlgorithm::Md5).with_opaque("o,p");
        let parsed = Challenge::parse_header(&c.to_header()).expect("parses");
        assert_eq!(parsed, vec![c]);
        assert_eq!(parsed[0].realm(), "re\"alm");
        assert_eq!(parsed[0].nonce(), "no\\nce");
        // A value cannot break out of its quotes to add parameters.
        let evil = Challenge::new("x\", stale=true, y=\"", "n", DigestAlgorithm::Md5);
        let parsed = Challenge::parse_header(&evil.to_header()).expect("parses");
        assert!(!parsed[0].is_stale());
        assert_eq!(parsed[0].realm(), "x\", stale=true, y=\"");
    }

    #[test]
    fn json_query_reply_round_trip_and_errors() {
        let r = JsonQueryReply::value("PWR?", "04");
        assert_eq!(JsonQueryReply::parse(r.to_json().as_bytes()), Ok(r));
        let e = JsonQueryReply::refused("VER?");
        let back = JsonQueryReply::parse(e.to_json().as_bytes()).expect("parses");
        assert!(back.is_error());
        assert_eq!(back.reply(), "ERR");
        let real = br#"{"projector":{"feature":{"name":"esc/vp21","query":"SOURCELIST?","reply":"30 HDMI1 A0 HDMI2","error":false}}}"#;
        let r = JsonQueryReply::parse(real).expect("parses");
        assert_eq!(
            (r.query(), r.reply(), r.is_error()),
            ("SOURCELIST?", "30 HDMI1 A0 HDMI2", false)
        );
        for bad in [
            &b"<html>"[..],
            b"{}",
            br#"{"projector":{"feature":{"reply":4,"error":false}}}"#,
            br#"{"projector":{"feature":{"reply":"4"}}}"#,
            br#"{"projector":{"feature":{"reply":"4","error":"no"}}}"#,
            b"\xff\xfe",
        ] {
            assert!(JsonQueryReply::parse(bad).is_err(), "{bad:?}");
        }
        let long = JsonQueryReply::value("X?", &"a".repeat(MAX_REPLY_LEN + 1));
        assert!(JsonQueryReply::parse(long.to_json().as_bytes()).is_err());
    }

    proptest::proptest! {
        /// Arbitrary header values and bodies are errors or values, never panics.
        #[test]
        fn arbitrary_input_never_panics(s in "\\PC{0,300}", b in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = Challenge::parse_header(&s);
            let _ = Authorization::parse(&s);
            let _ = JsonQueryReply::parse(s.as_bytes());
            let _ = JsonQueryReply::parse(&b);
            if let Ok(t) = std::str::from_utf8(&b) {
                let _ = Challenge::parse_header(t);
            }
        }

        /// What we encode, we parse back unchanged; a response verifies with its password
        /// only.
        #[test]
        fn challenges_and_answers_round_trip(
            realm in "[ -~]{0,40}",
            nonce in "[ -~]{1,40}",
            password in "[ -~]{0,16}",
            uri in "/[!-~]{0,60}",
            nc in 1u32..,
            sha in proptest::bool::ANY,
        ) {
            let alg = if sha { DigestAlgorithm::Sha256 } else { DigestAlgorithm::Md5 };
            let c = Challenge::new(&realm, &nonce, alg).with_opaque("op");
            let parsed = Challenge::parse_header(&c.to_header()).expect("parses");
            proptest::prop_assert_eq!(&parsed, &vec![c.clone()]);
            let a = Authorization::respond(&parsed[0], DIGEST_USER, &password, "GET", &uri, "cn", nc);
            let back = Authorization::parse(&a.to_header()).expect("parses");
            proptest::prop_assert!(back.verify(&password, "GET"));
            let wrong = format!("{password}x");
            proptest::prop_assert!(!back.verify(&wrong, "GET"));
            proptest::prop_assert_eq!(back.nonce_count(), Some(nc));
        }
    }

    #[test]
    fn query_targets() {
        assert_eq!(
            json_query_target("PWR").as_deref(),
            Some("/cgi-bin/json_query?jsoncallback=PWR?")
        );
        assert_eq!(json_query_target("PWR ON"), None);
        assert_eq!(json_query_target(""), None);
        assert_eq!(json_query_target("A&B"), None);
    }
}
