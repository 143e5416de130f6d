//! MQTT topic names: `epmc/v1/agents/{agent id}/{hello|telemetry|events|results|orders|state}`.
//!
//! The agent id is the UUID in the agent's certificate CN, so it is validated as a UUID and
//! always written in its lower-case hyphenated form: a topic can never carry `+`, `#`, `/` or
//! another agent's prefix.

use std::fmt;

use uuid::Uuid;

/// Topic prefix of every agent topic.
pub const PREFIX: &str = "epmc/v1/agents/";

/// A validated agent id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(Uuid);

impl AgentId {
    /// Wraps a UUID.
    pub fn new(id: Uuid) -> Self {
        AgentId(id)
    }

    /// Parses an id (e.g. a certificate CN); only a UUID is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidAgentId> {
        if s.len() > 45 {
            return Err(InvalidAgentId);
        }
        Uuid::try_parse(s).map(AgentId).map_err(|_| InvalidAgentId)
    }

    /// The UUID.
    pub fn uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({self})")
    }
}

/// The string is not a UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("agent id must be a UUID")]
pub struct InvalidAgentId;

/// The topics under one agent's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Agent info on every connect (agent → server).
    Hello,
    /// Snapshots and collections (agent → server).
    Telemetry,
    /// Events, alerts and exception logs (agent → server).
    Events,
    /// Order results (agent → server).
    Results,
    /// Orders (server → agent).
    Orders,
    /// `online` (retained) / `offline` (last will).
    State,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Channel; 6] = [
        Channel::Hello,
        Channel::Telemetry,
        Channel::Events,
        Channel::Results,
        Channel::Orders,
        Channel::State,
    ];

    /// The last topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Hello => "hello",
            Channel::Telemetry => "telemetry",
            Channel::Events => "events",
            Channel::Results => "results",
            Channel::Orders => "orders",
            Channel::State => "state",
        }
    }

    /// The channel a message kind is published on.
    pub fn for_kind(kind: crate::Kind) -> Channel {
        use crate::Kind;
        match kind {
            Kind::Hello => Channel::Hello,
            Kind::Snapshot | Kind::Collection => Channel::Telemetry,
            Kind::Event | Kind::ExceptionLog => Channel::Events,
            Kind::Order => Channel::Orders,
            Kind::OrderResult => Channel::Results,
        }
    }
}

/// The full topic of `channel` for `agent`.
pub fn topic(agent: &AgentId, channel: Channel) -> String {
    format!("{PREFIX}{agent}/{}", channel.as_str())
}

/// `epmc/v1/agents/{a}/hello`.
pub fn hello(agent: &AgentId) -> String {
    topic(agent, Channel::Hello)
}

/// `epmc/v1/agents/{a}/telemetry`.
pub fn telemetry(agent: &AgentId) -> String {
    topic(agent, Channel::Telemetry)
}

/// `epmc/v1/agents/{a}/events`.
pub fn events(agent: &AgentId) -> String {
    topic(agent, Channel::Events)
}

/// `epmc/v1/agents/{a}/results`.
pub fn results(agent: &AgentId) -> String {
    topic(agent, Channel::Results)
}

/// `epmc/v1/agents/{a}/orders`.
pub fn orders(agent: &AgentId) -> String {
    topic(agent, Channel::Orders)
}

/// `epmc/v1/agents/{a}/state`.
pub fn state(agent: &AgentId) -> String {
    topic(agent, Channel::State)
}

/// The filter a server subscribes to for every agent's channel, e.g. `epmc/v1/agents/+/telemetry`.
pub fn all_agents(channel: Channel) -> String {
    format!("{PREFIX}+/{}", channel.as_str())
}

/// Splits a topic into agent id and channel; `None` for anything else.
pub fn parse(topic: &str) -> Option<(AgentId, Channel)> {
    let rest = topic.strip_prefix(PREFIX)?;
    let (id, channel) = rest.split_once('/')?;
    let agent = AgentId::parse(id).ok()?;
    // Only the canonical spelling: a different case would be a different MQTT topic.
    if agent.to_string() != id {
        return None;
    }
    let channel = Channel::ALL.into_iter().find(|c| c.as_str() == channel)?;
    Some((agent, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_refuse_junk() {
        let a = AgentId::parse("6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f").unwrap();
        assert_eq!(
            telemetry(&a),
            "epmc/v1/agents/6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f/telemetry"
        );
        for c in Channel::ALL {
            assert_eq!(parse(&topic(&a, c)), Some((a, c)));
        }
        assert_eq!(all_agents(Channel::Events), "epmc/v1/agents/+/events");
        assert!(AgentId::parse("agent-001").is_err());
        assert!(AgentId::parse("+").is_err());
        assert!(AgentId::parse("#").is_err());
        assert_eq!(parse("epmc/v1/agents/+/telemetry"), None);
        assert_eq!(
            parse("epmc/v1/agents/6F1C2D3E-4A5B-4C6D-8E9F-0A1B2C3D4E5F/telemetry"),
            None
        );
        assert_eq!(
            parse("epmc/v1/agents/6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f/other"),
            None
        );
    }
}
