//! Group commit in two stages. The gatherer takes what every connection hands it (up to
//! `max_batch` messages that are waiting) and has the sink prepare it without the database
//! ([`IngestSink::prepare`]: decoding, say) while the committer is still committing the
//! batch before; the committer commits the prepared batches one at a time, in the order they
//! were gathered, and only then answers each connection (which sends its PUBACKs).
//!
//! A batch is prepared ahead, while the one before commits, only when it is full
//! (`max_batch` messages waiting: the endpoint is saturated and the overlap is throughput).
//! Otherwise the gatherer keeps taking what arrives until the commit in progress ends, and
//! then hands over everything at once: a message that arrives during a commit goes into the
//! next one and waits for that one commit besides its own, instead of also waiting behind a
//! batch prepared early and left one commit short (latency below capacity).
//!
//! A presence change (a connection or disconnection) waits up to
//! [`IngestConfig::presence_linger`](super::IngestConfig::presence_linger) for others unless a
//! message comes first, so that a burst of connections takes one commit.
//!
//! At most one prepared batch waits while one commits. Every message goes through one FIFO queue
//! from its connection to the committer, so one connection's (and so one agent's) messages
//! commit in the order they were received, and their answers come back in that order.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::Counters;
use super::sink::{Inbound, IngestSink, Outcome, Prepared};

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

/// What the gatherer hands the committer, in order.
enum Work {
    /// A prepared batch and, for each of its messages, where to answer.
    Batch(Prepared, Vec<Answer>),
    /// Presence changes that were waiting together, in order.
    States(Vec<(epmc_proto::topic::AgentId, bool)>),
    /// A prepared last will.
    Will(Prepared),
}

type Answer = (u64, mpsc::UnboundedSender<(u64, CommitResult)>);

/// Aborts the committer if the gatherer is dropped or aborted (a shutdown that timed out).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The gatherer; it starts the committer and ends after it.
pub(crate) async fn run(
    sink: Arc<dyn IngestSink>,
    counters: Arc<Counters>,
    max_batch: usize,
    presence_linger: std::time::Duration,
    mut data: mpsc::Receiver<Pending>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let max_batch = max_batch.max(1);
    // Capacity 1: one prepared batch waits while the committer works on the one before.
    let (work_tx, work_rx) = mpsc::channel::<Work>(1);
    // How much handed-over work the committer has not finished (0: it is idle).
    let unfinished = Arc::new(watch::Sender::new(0usize));
    let mut idle = unfinished.subscribe();
    let mut committer = AbortOnDrop(tokio::spawn(commit_loop(
        sink.clone(),
        counters,
        work_rx,
        unfinished.clone(),
    )));
    let handed_over = || unfinished.send_modify(|n| *n += 1);
    // A control item, or a message, taken while gathering presence changes, handled next.
    let mut peeked: Option<Control> = None;
    let mut stashed: Option<Pending> = None;
    loop {
        // Gather only once the committer can take more, so that a batch holds everything
        // that arrived while the one before was committing.
        let Ok(slot) = work_tx.reserve().await else {
            // The committer ended (it only does when this side is gone): nothing to do.
            return;
        };
        let next = match (peeked.take(), stashed.take()) {
            (Some(c), stash) => {
                stashed = stash;
                Next::Control(Some(c))
            }
            (None, Some(p)) => Next::Data(Some(p)),
            (None, None) => tokio::select! {
                biased;
                c = control.recv() => Next::Control(c),
                first = data.recv() => Next::Data(first),
            },
        };
        match next {
            Next::Control(Some(Control::State(agent, online))) => {
                // And the ones waiting behind it, and those that come within the linger
                // unless a message comes first: one commit for a burst of connections.
                let mut changes = vec![(agent, online)];
                let linger = tokio::time::sleep(presence_linger);
                tokio::pin!(linger);
                loop {
                    let next = match control.try_recv() {
                        Ok(c) => Some(c),
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                        Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                            biased;
                            c = control.recv() => match c {
                                Some(c) => Some(c),
                                None => break,
                            },
                            p = data.recv() => {
                                stashed = p;
                                break;
                            }
                            () = &mut linger => break,
                        },
                    };
                    match next {
                        Some(Control::State(agent, online)) => changes.push((agent, online)),
                        Some(other) => {
                            peeked = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                handed_over();
                slot.send(Work::States(changes));
            }
            Next::Control(Some(Control::Will(will))) => {
                let will = prepare(&sink, vec![will]).await;
                handed_over();
                slot.send(Work::Will(will));
            }
            Next::Control(Some(Control::Stop) | None) => {
                drop(slot);
                // Bounded: the queue has a capacity and no connection adds to it any more.
                while let Some(batch) = take_batch(&mut data, stashed.take(), max_batch) {
                    let work = prepare_batch(&sink, batch).await;
                    if work_tx.send(work).await.is_err() {
                        return;
                    }
                }
                drop(work_tx);
                let _ = (&mut committer.0).await;
                return;
            }
            Next::Data(first) => {
                let Some(first) = first else { continue };
                let Some(mut batch) = take_batch(&mut data, Some(first), max_batch) else {
                    continue;
                };
                // Not full and a commit in progress: take what arrives until it ends.
                while batch.len() < max_batch && *idle.borrow() > 0 {
                    tokio::select! {
                        biased;
                        _ = idle.wait_for(|n| *n == 0) => break,
                        next = data.recv() => match next {
                            Some(p) => {
                                batch.push(p);
                                while batch.len() < max_batch {
                                    match data.try_recv() {
                                        Ok(p) => batch.push(p),
                                        Err(_) => break,
                                    }
                                }
                            }
                            None => break,
                        },
                    }
                }
                let work = prepare_batch(&sink, batch).await;
                handed_over();
                slot.send(work);
            }
        }
    }
}

/// What the gatherer takes next.
enum Next {
    Control(Option<Control>),
    Data(Option<Pending>),
}

/// Commits what the gatherer hands over, one at a time, in order.
async fn commit_loop(
    sink: Arc<dyn IngestSink>,
    counters: Arc<Counters>,
    mut work: mpsc::Receiver<Work>,
    unfinished: Arc<watch::Sender<usize>>,
) {
    while let Some(w) = work.recv().await {
        match w {
            Work::Batch(prepared, answers) => {
                commit_and_answer(&*sink, &counters, prepared, answers).await;
            }
            Work::States(changes) => sink.agent_states(changes).await,
            Work::Will(will) => {
                if let Err(e) = commit(&*sink, &counters, will).await {
                    tracing::warn!(error = %e, "a last will could not be stored");
                }
            }
        }
        unfinished.send_modify(|n| *n = n.saturating_sub(1));
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

async fn prepare_batch(sink: &Arc<dyn IngestSink>, batch: Vec<Pending>) -> Work {
    let mut answers = Vec::with_capacity(batch.len());
    let mut inbound = Vec::with_capacity(batch.len());
    for p in batch {
        inbound.push(p.inbound);
        answers.push((p.seq, p.reply));
    }
    Work::Batch(prepare(sink, inbound).await, answers)
}

/// [`IngestSink::prepare`] on the blocking pool: it may take a while (decoding a few hundred
/// messages) and must not hold up the connections' tasks.
async fn prepare(sink: &Arc<dyn IngestSink>, batch: Vec<Inbound>) -> Prepared {
    let sink = sink.clone();
    let n = batch.len();
    let fallback = batch.clone();
    match tokio::task::spawn_blocking(move || sink.prepare(batch)).await {
        Ok(prepared) => prepared,
        // The preparation panicked (or the runtime is shutting down): commit the batch
        // unprepared, so the sink decides what becomes of it.
        Err(e) => {
            tracing::error!(error = %e, n, "preparing a batch failed");
            Prepared::unprepared(fallback)
        }
    }
}

async fn commit(
    sink: &dyn IngestSink,
    counters: &Counters,
    batch: Prepared,
) -> Result<(), super::sink::SinkError> {
    let n = batch.len();
    let outcomes = sink.commit_prepared(batch).await?;
    if outcomes.len() != n {
        return Err(super::sink::SinkError(format!(
            "{} outcome(s) for {n} message(s)",
            outcomes.len()
        )));
    }
    counters.add_batch(&outcomes);
    Ok(())
}

async fn commit_and_answer(
    sink: &dyn IngestSink,
    counters: &Counters,
    batch: Prepared,
    answers: Vec<Answer>,
) {
    let started = std::time::Instant::now();
    let n = batch.len();
    let committed = commit(sink, counters, batch).await;
    tracing::debug!(messages = n, elapsed = ?started.elapsed(), "batch committed");
    let result = match committed {
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
