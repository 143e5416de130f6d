//! Group commit: one task takes what every connection hands it, commits what is waiting as
//! one batch, and only then answers each connection (which sends its PUBACKs).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Counters;
use super::sink::{Inbound, IngestSink, Outcome};

/// The commit of one message succeeded (`Ok`) or failed (`Err`).
pub(crate) type CommitResult = Result<(), ()>;

/// A message waiting for its commit, with where to answer and its sequence number on its
/// connection (checked there: answers come back in order).
pub(crate) struct Pending {
    pub(crate) inbound: Inbound,
    pub(crate) seq: u64,
    pub(crate) reply: mpsc::UnboundedSender<(u64, CommitResult)>,
}

/// Presence and will, in the order the connections' registrations happened.
pub(crate) enum Control {
    State(epmc_proto::topic::AgentId, bool),
    /// A last will to store (no one to acknowledge it to).
    Will(Inbound),
    /// Commit what is still queued, then end.
    Stop,
}

pub(crate) async fn run(
    sink: Arc<dyn IngestSink>,
    counters: Arc<Counters>,
    max_batch: usize,
    mut data: mpsc::Receiver<Pending>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let max_batch = max_batch.max(1);
    loop {
        tokio::select! {
            biased;
            c = control.recv() => match c {
                Some(Control::State(agent, online)) => sink.agent_state(agent, online).await,
                Some(Control::Will(will)) => {
                    if let Err(e) = commit(&*sink, &counters, vec![will]).await {
                        tracing::warn!(error = %e, "a last will could not be stored");
                    }
                }
                Some(Control::Stop) | None => {
                    // Bounded: the queue has a capacity and no connection adds to it any more.
                    while let Some(batch) = take_batch(&mut data, None, max_batch) {
                        commit_and_answer(&*sink, &counters, batch).await;
                    }
                    return;
                }
            },
            first = data.recv() => {
                let Some(first) = first else { continue };
                if let Some(batch) = take_batch(&mut data, Some(first), max_batch) {
                    commit_and_answer(&*sink, &counters, batch).await;
                }
            }
        }
    }
}

/// `first` and whatever else is already waiting, up to `max`; `None` when nothing is.
fn take_batch(
    data: &mut mpsc::Receiver<Pending>,
    first: Option<Pending>,
    max: usize,
) -> Option<Vec<Pending>> {
    let mut batch: Vec<Pending> = first.into_iter().collect();
    while batch.len() < max {
        match data.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
    (!batch.is_empty()).then_some(batch)
}

async fn commit(
    sink: &dyn IngestSink,
    counters: &Counters,
    batch: Vec<Inbound>,
) -> Result<(), super::sink::SinkError> {
    let n = batch.len();
    let outcomes = sink.commit(batch).await?;
    if outcomes.len() != n {
        return Err(super::sink::SinkError(format!(
            "{} outcome(s) for {n} message(s)",
            outcomes.len()
        )));
    }
    counters.add_batch(&outcomes);
    Ok(())
}

async fn commit_and_answer(sink: &dyn IngestSink, counters: &Counters, batch: Vec<Pending>) {
    let mut answers = Vec::with_capacity(batch.len());
    let mut inbound = Vec::with_capacity(batch.len());
    for p in batch {
        inbound.push(p.inbound);
        answers.push((p.seq, p.reply));
    }
    let result = match commit(sink, counters, inbound).await {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "commit failed; its connections close unacknowledged");
            Err(())
        }
    };
    // In batch order, which is each connection's order: its answers come back in sequence.
    for (seq, reply) in answers {
        let _ = reply.send((seq, result));
    }
}

impl Counters {
    fn add_batch(&self, outcomes: &[Outcome]) {
        use std::sync::atomic::Ordering::Relaxed;
        self.batches.fetch_add(1, Relaxed);
        self.committed.fetch_add(outcomes.len() as u64, Relaxed);
        for o in outcomes {
            match o {
                Outcome::Stored => {}
                Outcome::Duplicate => {
                    self.duplicates.fetch_add(1, Relaxed);
                }
                Outcome::Rejected(_) => {
                    self.rejected.fetch_add(1, Relaxed);
                }
            }
        }
    }
}
