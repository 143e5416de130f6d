//! Security events on their way to the store, at a bounded rate.
//!
//! Most security events can be caused by anyone who reaches a port: a TCP connection over the
//! limit, a TLS handshake without a certificate, a forged enrollment token. One row (and one
//! log line) for each would let such a peer write to the disk and the log as fast as it can
//! connect. So events are recorded one by one up to a rate, in two classes with a token
//! bucket each: those that name an agent (its certificate is the CA's, so it can be revoked)
//! and the anonymous rest, so that a flood of anonymous events cannot crowd out an agent's.
//! Over the rate an event is counted instead; the counts are recorded as one `suppressed`
//! event per class at every [`SecurityEventLimit::summary_every`] and when the server stops.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use epmc_proto::bounded::Timestamp;
use epmc_proto::topic::AgentId;
use tokio::sync::watch;

use crate::store::Store;

/// How many security events are recorded one by one (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct SecurityEventLimit {
    /// Events of a class recorded at once before the rate applies.
    pub burst: u32,
    /// Events of a class recorded per second over time.
    pub per_second: f64,
    /// How often the counts of the events over the rate are recorded.
    pub summary_every: Duration,
}

impl Default for SecurityEventLimit {
    /// 100 at once, then 10 per second in each class; counts every minute.
    fn default() -> Self {
        SecurityEventLimit {
            burst: 100,
            per_second: 10.0,
            summary_every: Duration::from_secs(60),
        }
    }
}

/// The kind of the event that carries the counts.
pub const SUPPRESSED: &str = "suppressed";

/// How many agents or peers a summary names (the rest are counted).
const NAMED_IN_SUMMARY: usize = 5;

/// The recorder. One per server; the ingest sink and the enrollment endpoint share it.
pub(crate) struct SecurityLog {
    store: Store,
    limiter: Limiter,
}

/// The two classes' buckets and counts.
struct Limiter {
    limit: SecurityEventLimit,
    classes: Mutex<[Class; 2]>,
}

/// One class's bucket and what it did not record.
#[derive(Default)]
struct Class {
    tokens: f64,
    refilled: Option<Instant>,
    over: Over,
}

/// Events counted instead of recorded since the last summary.
#[derive(Default)]
struct Over {
    total: u64,
    kinds: BTreeMap<String, u64>,
    /// Agents (named class) or peer addresses (anonymous class), the first few.
    who: BTreeSet<String>,
    more: bool,
    /// Seconds since the Unix epoch.
    first: Option<i64>,
    last: Option<i64>,
}

impl Over {
    fn count(&mut self, kind: &str, who: Option<String>) {
        self.total += 1;
        *self.kinds.entry(kind.to_owned()).or_default() += 1;
        if let Some(who) = who
            && !self.who.contains(&who)
        {
            if self.who.len() < NAMED_IN_SUMMARY {
                self.who.insert(who);
            } else {
                self.more = true;
            }
        }
        let now = Timestamp::now().unix();
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    fn describe(&self, named: bool, limit: &SecurityEventLimit) -> String {
        let mut s = format!(
            "{} {} security events over the rate ({} at once, then {}/s) were counted, not recorded one by one",
            self.total,
            if named { "agents'" } else { "anonymous" },
            limit.burst,
            limit.per_second,
        );
        let at = |t: Option<i64>| t.and_then(|t| Timestamp::from_unix(t).ok());
        match (at(self.first), at(self.last)) {
            (Some(first), Some(last)) if first == last => {
                let _ = write!(s, ", at {first:?}");
            }
            (Some(first), Some(last)) => {
                let _ = write!(s, ", between {first:?} and {last:?}");
            }
            _ => {}
        }
        s.push(':');
        for (kind, n) in &self.kinds {
            let _ = write!(s, " {kind} {n},");
        }
        s.pop();
        if !self.who.is_empty() {
            let names: Vec<&str> = self.who.iter().map(String::as_str).collect();
            let _ = write!(
                s,
                "; {} {}{}",
                if named { "agents" } else { "from" },
                names.join(", "),
                if self.more { " and others" } else { "" }
            );
        }
        s
    }
}

impl Limiter {
    fn new(limit: SecurityEventLimit) -> Limiter {
        Limiter {
            limit,
            classes: Mutex::new(Default::default()),
        }
    }

    /// Takes a token of the event's class, or counts the event as over the rate.
    fn admit(&self, now: Instant, kind: &str, agent: Option<AgentId>, peer: Option<&str>) -> bool {
        let burst = f64::from(self.limit.burst);
        let mut classes = self
            .classes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let class = &mut classes[usize::from(agent.is_some())];
        class.tokens = match class.refilled {
            None => burst,
            Some(then) => (class.tokens
                + now.duration_since(then).as_secs_f64() * self.limit.per_second.max(0.0))
            .min(burst),
        };
        class.refilled = Some(now);
        if class.tokens >= 1.0 {
            class.tokens -= 1.0;
            return true;
        }
        // Peers by address only: every connection has a port of its own.
        let who = match (agent, peer) {
            (Some(agent), _) => Some(agent.to_string()),
            (None, Some(peer)) => Some(
                peer.parse::<SocketAddr>()
                    .map_or_else(|_| peer.to_owned(), |a| a.ip().to_string()),
            ),
            (None, None) => None,
        };
        class.over.count(kind, who);
        false
    }

    /// The counts since the last summary, one text per class that counted any; starts over.
    fn take_summaries(&self) -> Vec<String> {
        let mut classes = self
            .classes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        classes
            .iter_mut()
            .enumerate()
            .filter(|(_, c)| c.over.total > 0)
            .map(|(named, c)| std::mem::take(&mut c.over).describe(named == 1, &self.limit))
            .collect()
    }
}

impl SecurityLog {
    pub(crate) fn new(store: Store, limit: SecurityEventLimit) -> SecurityLog {
        SecurityLog {
            store,
            limiter: Limiter::new(limit),
        }
    }

    /// Records one event, or counts it when its class is over the rate. `peer` is `ip:port`
    /// (or an IP).
    pub(crate) async fn record(
        &self,
        kind: &str,
        agent: Option<AgentId>,
        peer: Option<&str>,
        detail: &str,
    ) {
        if !self.limiter.admit(Instant::now(), kind, agent, peer) {
            tracing::debug!(
                kind,
                ?agent,
                peer,
                detail,
                "security event over the rate, counted"
            );
            return;
        }
        tracing::warn!(kind, ?agent, peer, detail, "security event");
        self.insert(kind, agent, peer, detail).await;
    }

    /// Records the counts since the last summary: one event per class that counted any.
    pub(crate) async fn flush(&self) {
        for detail in self.limiter.take_summaries() {
            tracing::warn!(kind = SUPPRESSED, detail, "security events counted");
            self.insert(SUPPRESSED, None, None, &detail).await;
        }
    }

    async fn insert(&self, kind: &str, agent: Option<AgentId>, peer: Option<&str>, detail: &str) {
        if let Err(e) = self
            .store
            .ingest()
            .record_security_event(kind, agent, peer, detail)
            .await
        {
            tracing::error!(error = %e, kind, "could not record a security event");
        }
    }

    /// Records the counts every [`SecurityEventLimit::summary_every`] until `stop`. The
    /// server records the last counts itself when it stops (after its listeners).
    pub(crate) async fn summarize_periodically(&self, mut stop: watch::Receiver<bool>) {
        let every = self
            .limiter
            .limit
            .summary_every
            .max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => self.flush().await,
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(burst: u32, per_second: f64) -> Limiter {
        Limiter::new(SecurityEventLimit {
            burst,
            per_second,
            ..SecurityEventLimit::default()
        })
    }

    #[test]
    fn a_burst_then_the_rate_and_never_more_than_the_burst_saved_up() {
        let l = limiter(3, 2.0);
        let t0 = Instant::now();
        let anonymous =
            |l: &Limiter, t: Instant| l.admit(t, "connection_limit", None, Some("10.0.0.1:1"));
        assert!((0..3).all(|_| anonymous(&l, t0)), "the burst");
        assert!(!anonymous(&l, t0), "then nothing at once");
        // Half a second at 2/s: one more.
        let t1 = t0 + Duration::from_millis(500);
        assert!(anonymous(&l, t1));
        assert!(!anonymous(&l, t1));
        // An hour idle saves up the burst, not 7 200.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| anonymous(&l, t2)).count(), 3);
        let [summary] = l.take_summaries().try_into().unwrap();
        assert!(
            summary.starts_with("9 anonymous security events over the rate (3 at once, then 2/s)"),
            "{summary}"
        );
        assert!(
            summary.ends_with(": connection_limit 9; from 10.0.0.1"),
            "{summary}"
        );
        assert!(l.take_summaries().is_empty(), "the counts start over");
    }

    #[test]
    fn an_anonymous_flood_does_not_use_up_the_agents_bucket() {
        let l = limiter(2, 0.0);
        let now = Instant::now();
        let agent = AgentId::new(uuid::Uuid::new_v4());
        for port in 0..100 {
            l.admit(
                now,
                "tls_no_certificate",
                None,
                Some(&format!("192.0.2.{}:{port}", port % 7)),
            );
        }
        assert!(l.admit(now, "publish_outside_prefix", Some(agent), None));
        assert!(l.admit(now, "publish_outside_prefix", Some(agent), None));
        assert!(!l.admit(now, "publish_outside_prefix", Some(agent), None));
        let summaries = l.take_summaries();
        assert_eq!(summaries.len(), 2, "{summaries:?}");
        // Peers by address, the first five, then "and others".
        assert!(
            summaries[0].contains(": tls_no_certificate 98; from 192.0.2.2, 192.0.2.3, 192.0.2.4, 192.0.2.5, 192.0.2.6 and others"),
            "{}",
            summaries[0]
        );
        assert!(
            summaries[1].starts_with("1 agents' security events")
                && summaries[1].ends_with(&format!(": publish_outside_prefix 1; agents {agent}")),
            "{}",
            summaries[1]
        );
    }
}
