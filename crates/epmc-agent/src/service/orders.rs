//! Orders: the on-disk journal, and what each action does to a projector.
//!
//! # The journal
//!
//! An order is written to the journal (an [`Outbox`] of its own, synced on every push) before
//! it is acknowledged to the broker, so a crash between receipt and execution loses nothing:
//! after a restart the journal's pending orders run. An order is removed from the journal
//! (and the removal synced) only after its final result is in the outbox. A repeated order id
//! is recognized while it is pending, and for the last [`ACKED_MEMORY`] finished orders, and
//! is acknowledged again but not executed again.
//!
//! One window remains, and it is documented rather than hidden: a crash after an action
//! reached the projector and before its result was written runs the action again after the
//! restart. Every action here is idempotent on a projector (power on, mute on, source X,
//! setting X), so running it twice leaves the same state.
//!
//! [`ACKED_MEMORY`]: epmc_transport::outbox::ACKED_MEMORY

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use epmc_proto::bounded::{BoundedString, Timestamp};
use epmc_proto::order::{
    FailureReason, Order, OrderAction, OrderOutcome, OrderResult, SettingName,
};
use epmc_proto::{Envelope, Message};
use epmc_transport::outbox::{Limits, Outbox, OutboxError};
use epmc_transport::{MessageId, OutboundMessage, Priority};
use escvp::client::ClientError;
use escvp::session::{Answer, CommandError};
use escvp::value::{Mute, OnOff, Power, PowerCommand, Source, SourceCode};
use escvp::vp21::Command;

use crate::collect::{CollectError, Projector};

/// The journal of orders received and not finished; see the [module docs](self).
#[derive(Debug)]
pub struct Journal {
    log: Outbox,
    in_progress: HashSet<MessageId>,
}

/// What [`Journal::record`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// A new order: run it.
    New,
    /// Already pending or recently finished: acknowledge it, do not run it again.
    Duplicate,
}

fn id_of(order: &Order) -> MessageId {
    MessageId::from_bytes(order.order_id.into_bytes())
}

impl Journal {
    /// Opens (or creates) the journal in `dir`.
    pub fn open(dir: &Path) -> Result<Journal, OutboxError> {
        let log = Outbox::open(
            dir,
            Limits {
                max_bytes: 64 * 1024 * 1024,
                max_messages: 100_000,
            },
        )?;
        let in_progress = log.pending().map(|h| h.message.id).collect();
        Ok(Journal { log, in_progress })
    }

    /// The orders recorded and not finished, in arrival order (to run after a restart).
    /// Entries that no longer decode are skipped and logged.
    pub fn pending(&self) -> Vec<Order> {
        self.log
            .pending()
            .filter_map(|h| match Envelope::from_json(&h.message.payload) {
                Ok(Envelope {
                    message: Message::Order(o),
                    ..
                }) => Some(o),
                other => {
                    tracing::error!(id = ?h.message.id, ?other, "unreadable order in the journal skipped");
                    None
                }
            })
            .collect()
    }

    /// How many orders are recorded and not finished.
    pub fn in_progress(&self) -> usize {
        self.in_progress.len()
    }

    /// Records an order durably (synced) unless it is already known. `payload` is the order's
    /// envelope as received.
    pub fn record(&mut self, order: &Order, payload: Bytes) -> Result<Recorded, OutboxError> {
        let id = id_of(order);
        if self.in_progress.contains(&id) || self.log.recently_acked(&id) {
            return Ok(Recorded::Duplicate);
        }
        self.log.push(OutboundMessage {
            id,
            topic: "orders".into(),
            payload,
            priority: Priority::Critical,
        })?;
        self.in_progress.insert(id);
        Ok(Recorded::New)
    }

    /// Marks an order finished (its final result is in the outbox), durably.
    pub fn finish(&mut self, order: &Order) -> Result<(), OutboxError> {
        let id = id_of(order);
        self.log.ack_id(&id)?;
        self.log.sync()?;
        self.in_progress.remove(&id);
        Ok(())
    }
}

/// A result for `order` now.
pub fn result(order: &Order, outcome: OrderOutcome, reply: Option<String>) -> OrderResult {
    OrderResult {
        order_id: order.order_id,
        at: Timestamp::now(),
        outcome,
        device_reply: reply.map(|r| truncate(&r)),
    }
}

/// A failure result.
pub fn failed(
    order: &Order,
    reason: FailureReason,
    detail: &str,
    reply: Option<String>,
) -> OrderResult {
    result(
        order,
        OrderOutcome::Failed {
            reason,
            detail: Some(text(detail)),
        },
        reply,
    )
}

fn truncate<const N: usize>(s: &str) -> BoundedString<N> {
    let mut end = s.len();
    loop {
        if let Ok(b) = BoundedString::new(&s[..end]) {
            return b;
        }
        end = s[..end.saturating_sub(1)]
            .char_indices()
            .last()
            .map_or(0, |(i, _)| i);
        if end == 0 {
            return BoundedString::default();
        }
    }
}

/// Bounded text, cut where needed (and with control characters replaced).
pub fn text<const N: usize>(s: &str) -> BoundedString<N> {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncate(&clean)
}

/// Checks an order the agent can refuse before touching a device. `None`: go ahead.
pub fn precheck(order: &Order, now: Timestamp) -> Option<OrderResult> {
    if let Some(exp) = order.expires_at
        && exp.unix() < now.unix()
    {
        return Some(failed(
            order,
            FailureReason::NotPermitted,
            &format!(
                "the order expired (unix time {}) before it could run",
                exp.unix()
            ),
            None,
        ));
    }
    if let Err(e) = order.validate() {
        return Some(failed(order, FailureReason::NotPermitted, e, None));
    }
    None
}

/// The ESC/VP21 command a setting is changed with.
pub fn setting_command(name: SettingName) -> &'static str {
    match name {
        SettingName::ProjectorName => "NWPNAME",
        SettingName::ColorMode => "CMODE",
        SettingName::LuminanceMode => "LUMINANCE",
        SettingName::LuminanceConstantLevel => "LUMLEVEL",
        SettingName::Volume => "VOL",
        SettingName::MuteScreen => "MSEL",
    }
}

/// How long a power order may wait for the projector to settle (after the colon) in
/// warm-up or cool-down.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(120);

/// Runs a device action on an open session. `CollectNow` is handled by the caller (it
/// publishes a collection).
pub async fn execute(projector: &mut Projector, order: &Order) -> OrderResult {
    let client = projector.client().clone();
    let outcome: Result<String, (ClientError, String)> = match &order.action {
        OrderAction::PowerOn => match client.power(PowerCommand::On).await {
            // The colon comes after warm-up; confirm the state.
            Ok(()) => settle(projector, &[0x01], "PWR ON").await,
            Err(e) => Err((e, "PWR ON".into())),
        },
        OrderAction::PowerOff => match client.power(PowerCommand::Off).await {
            // Cool-down follows the colon: wait until standby.
            Ok(()) => settle(projector, &[0x00, 0x04], "PWR OFF").await,
            Err(e) => Err((e, "PWR OFF".into())),
        },
        OrderAction::AvMute { on } => {
            let v = if *on { OnOff::On } else { OnOff::Off };
            let cmd = format!("MUTE {}", if *on { "ON" } else { "OFF" });
            client
                .set::<Mute>(&v)
                .await
                .map(|()| format!("{cmd}: accepted"))
                .map_err(|e| (e, cmd))
        }
        OrderAction::SourceChange { source } => {
            let cmd = format!("SOURCE {:02X}", source.get());
            client
                .set::<Source>(&SourceCode::new(source.get()))
                .await
                .map(|()| format!("{cmd}: accepted"))
                .map_err(|e| (e, cmd))
        }
        OrderAction::ChangeSetting { name, value } => {
            let name = setting_command(*name);
            let cmd = format!("{name} {}", value.as_str());
            match Command::set(name, value.as_str()) {
                Ok(c) => match client.execute(c).await {
                    Ok(Answer::Ack) => Ok(format!("{cmd}: accepted")),
                    Ok(other) => Err((ClientError::UnexpectedAnswer(other), cmd)),
                    Err(e) => Err((e, cmd)),
                },
                Err(e) => {
                    return failed(
                        order,
                        FailureReason::NotPermitted,
                        &format!("{cmd} is not a valid command: {e}"),
                        None,
                    );
                }
            }
        }
        OrderAction::CollectNow | OrderAction::CheckAgentUpdate => {
            return failed(
                order,
                FailureReason::NotPermitted,
                "not a device action",
                None,
            );
        }
    };
    match outcome {
        Ok(reply) => result(order, OrderOutcome::Done, Some(reply)),
        Err((e, cmd)) => client_failure(order, &cmd, e),
    }
}

/// Waits (polling `PWR?`) until the projector's power code is one of `wanted`.
async fn settle(
    projector: &mut Projector,
    wanted: &[u8],
    cmd: &str,
) -> Result<String, (ClientError, String)> {
    let client = projector.client().clone();
    let deadline = tokio::time::Instant::now() + SETTLE_WITHIN;
    loop {
        match client.get::<Power>().await {
            Ok(code) if wanted.contains(&code.get()) => {
                return Ok(format!("{cmd}: accepted; PWR={:02X}", code.get()));
            }
            Ok(_) | Err(ClientError::Command(CommandError::Refused)) => {}
            Err(e) => return Err((e, "PWR?".into())),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err((
                ClientError::Command(CommandError::TimedOut(SETTLE_WITHIN)),
                format!("{cmd} (waiting for the projector to settle)"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn client_failure(order: &Order, cmd: &str, e: ClientError) -> OrderResult {
    match e {
        ClientError::Command(CommandError::Refused) => failed(
            order,
            FailureReason::DeviceRefused,
            &format!("the projector refused {cmd}"),
            Some("ERR".into()),
        ),
        ClientError::Command(CommandError::TimedOut(_)) => failed(
            order,
            FailureReason::TimedOut,
            &format!("no answer to {cmd} in time"),
            None,
        ),
        ClientError::UnexpectedAnswer(a) => failed(
            order,
            FailureReason::DeviceRefused,
            &format!("unexpected answer to {cmd}"),
            Some(format!("{a:?}")),
        ),
        other => failed(
            order,
            FailureReason::DeviceUnreachable,
            &format!("{cmd}: {other}"),
            None,
        ),
    }
}

/// The result for an order that could not reach its device.
pub fn unreachable(order: &Order, e: &CollectError) -> OrderResult {
    let reason = match e {
        CollectError::TimedOut(_) => FailureReason::TimedOut,
        CollectError::PasswordRequired | CollectError::WrongPassword | CollectError::NotAllowed => {
            FailureReason::DeviceRefused
        }
        _ => FailureReason::DeviceUnreachable,
    };
    failed(
        order,
        reason,
        &format!("the projector could not be reached: {e}"),
        None,
    )
}
