//! One task per target address: it reads the projector on schedule, runs the orders for it
//! one after another, and (in `hold` mode) forwards its IMEVENT notifications as they come.
//!
//! Commands to one projector are strictly serialized: only this task talks to it, one
//! command at a time. Reads take a permit from the service-wide semaphore (the configured
//! concurrency); a held session does not hold a permit while idle.
//!
//! A target that does not answer is retried with a growing pause (its status interval,
//! doubling up to eight times that); one with orders waiting is retried sooner until each
//! order has had [`ORDER_ATTEMPTS`] tries. A busy projector (ESC/VP.net 0x53: another
//! controller holds its session) is shown as busy, not as faulty, and retried later.

use std::collections::VecDeque;
use std::time::Duration;

use epmc_proto::bounded::Timestamp;
use epmc_proto::model::{DeviceEvent, DeviceEventKind};
use epmc_proto::order::{Order, OrderAction, OrderOutcome};
use epmc_proto::{Message, model::Severity};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::Ctx;
use super::orders;
use super::status::Reach;
use crate::collect::{CollectError, Notifications, Projector, Stage};
use crate::config::{Endpoint, SessionMode};
use crate::http;

/// Tries an order gets on an unreachable projector before it fails.
pub const ORDER_ATTEMPTS: u32 = 3;

/// What a device task is asked to do.
pub(crate) enum Work {
    /// Run an order.
    Order(Order),
    /// Read the copyable settings (the source side of a copy-settings order).
    ReadProfile(Option<oneshot::Sender<Result<orders::Profile, String>>>),
    /// Apply settings read from another device (the target side of a copy-settings order).
    Apply(Order, orders::Profile),
}

struct Job {
    work: Work,
    attempts: u32,
}

impl Job {
    fn new(work: Work) -> Job {
        Job { work, attempts: 0 }
    }
}

pub(super) struct DeviceTask {
    ctx: std::sync::Arc<Ctx>,
    endpoint: Endpoint,
    jobs_rx: mpsc::UnboundedReceiver<Box<Work>>,
    jobs: VecDeque<Job>,
    device_id: Option<String>,
    failures: u32,
    /// Whether the last contact succeeded (`None`: never tried).
    reachable: Option<bool>,
    /// Whether the last attempt timed out: the next one keeps its concurrency slot only while
    /// the projector answers about as fast as the others (see [`super::Pace`]).
    suspect: bool,
    next_status: Instant,
    next_full: Instant,
    first_done: bool,
}

enum Wake {
    Due,
    Job(Box<Work>),
    Stop,
}

impl DeviceTask {
    pub(super) fn new(
        ctx: std::sync::Arc<Ctx>,
        endpoint: Endpoint,
        jobs_rx: mpsc::UnboundedReceiver<Box<Work>>,
        start_in: Duration,
    ) -> DeviceTask {
        let now = Instant::now();
        DeviceTask {
            endpoint,
            jobs_rx,
            jobs: VecDeque::new(),
            device_id: None,
            failures: 0,
            reachable: None,
            suspect: false,
            next_status: now + start_in,
            // A full collection on the first contact: the server learns what the device is.
            next_full: if ctx.full_on_first_contact {
                now + start_in
            } else {
                now + ctx.schedule.full_collection_interval
            },
            first_done: false,
            ctx,
        }
    }

    pub(super) async fn run(mut self) {
        match self.endpoint.session {
            SessionMode::Poll => self.run_poll().await,
            SessionMode::Hold => self.run_hold().await,
        }
        self.mark_first_done();
    }

    /// When the next contact is due: the next read, or now when orders wait for a projector
    /// that answered last time.
    fn due(&self) -> Instant {
        if self.jobs_ready() {
            Instant::now()
        } else {
            self.next_status.min(self.next_full)
        }
    }

    fn jobs_ready(&self) -> bool {
        !self.jobs.is_empty() && self.reachable != Some(false)
    }

    fn is_due(&self) -> bool {
        self.jobs_ready() || Instant::now() >= self.next_status.min(self.next_full)
    }

    async fn wait(&mut self, until: Instant) -> Wake {
        let mut stop = self.ctx.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(until) => Wake::Due,
            job = self.jobs_rx.recv() => match job {
                Some(o) => Wake::Job(o),
                None => Wake::Stop,
            },
            () = stopped(&mut stop) => Wake::Stop,
        }
    }

    fn take_queued(&mut self) {
        while let Ok(work) = self.jobs_rx.try_recv() {
            self.jobs.push_back(Job::new(*work));
        }
    }

    async fn run_poll(&mut self) {
        loop {
            match self.wait(self.due()).await {
                Wake::Stop => return,
                Wake::Job(work) => self.jobs.push_back(Job::new(*work)),
                Wake::Due => {}
            }
            if !self.is_due() {
                continue;
            }
            self.take_queued();
            let ctx = self.ctx.clone();
            // Boxed: the work runs in at most `concurrency` tasks at a time, while every
            // idle device task (thousands) would otherwise carry its whole state inline.
            let slot = ctx.slot().await;
            let (answers, answered) = watch::channel(0);
            let suspect = self.suspect;
            let session = Box::pin(ctx.talking(slot, answered, suspect, async {
                let mut p = self.connect(answers).await?;
                self.work(&mut p, None).await;
                Ok(p)
            }))
            .await;
            match session {
                Ok(p) => Box::pin(p.close()).await,
                Err(e) => {
                    if !Box::pin(self.try_http(&e)).await {
                        Box::pin(self.failed(e)).await;
                    }
                }
            }
            self.mark_first_done();
        }
    }

    async fn run_hold(&mut self) {
        loop {
            let stopping = *self.ctx.stop.borrow();
            if stopping {
                return;
            }
            self.take_queued();
            let ctx = self.ctx.clone();
            let slot = ctx.slot().await;
            let (answers, answered) = watch::channel(0);
            let connected =
                Box::pin(ctx.talking(slot, answered.clone(), self.suspect, self.connect(answers)))
                    .await;
            let mut p = match connected {
                Ok(p) => p,
                Err(e) => {
                    if !Box::pin(self.try_http(&e)).await {
                        Box::pin(self.failed(e)).await;
                    }
                    self.mark_first_done();
                    // Wait for the retry time (orders still queue meanwhile).
                    loop {
                        let until = self.due();
                        match self.wait(until).await {
                            Wake::Stop => return,
                            Wake::Job(work) => self.jobs.push_back(Job::new(*work)),
                            Wake::Due => break,
                        }
                        if self.is_due() {
                            break;
                        }
                    }
                    continue;
                }
            };
            let mut notes: Option<Notifications> = None;
            // The first work identifies the device, so notifications carry its serial.
            if !Box::pin(self.work(&mut p, Some(&mut notes))).await {
                p.close().await;
                continue;
            }
            self.mark_first_done();
            let mut notes = match notes {
                Some(n) => n,
                None => p.notifications(),
            };
            let mut stop = self.ctx.stop.clone();
            loop {
                let until = self.due();
                tokio::select! {
                    event = notes.next() => match event {
                        Some(ev) => Box::pin(self.publish_event(ev)).await,
                        None => {
                            Box::pin(self.failed(CollectError::Dropped)).await;
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(until) => {
                        self.take_queued();
                        let ctx = self.ctx.clone();
                        let slot = ctx.slot().await;
                        let ok = Box::pin(ctx.talking(
                            slot,
                            answered.clone(),
                            false,
                            self.work(&mut p, None),
                        ))
                        .await;
                        if !ok {
                            break;
                        }
                    }
                    job = self.jobs_rx.recv() => match job {
                        Some(work) => self.jobs.push_back(Job::new(*work)),
                        None => { p.close().await; return; }
                    },
                    () = stopped(&mut stop) => { p.close().await; return; }
                }
            }
            p.close().await;
        }
    }

    /// The HTTP `json_query` fallback, where ESC/VP.net is not served (refused, closed, or
    /// "Protected"): reads over HTTP what is due. Returns whether an HTTP server answered (the
    /// outcome, a read or a failure, is then recorded); `false` leaves the ESC/VP.net error
    /// to the caller. Orders need ESC/VP.net: those waiting fail with a reason.
    async fn try_http(&mut self, tcp_error: &CollectError) -> bool {
        let Some(port) = self.endpoint.http_port else {
            return false;
        };
        if !http::fallback_applies(tcp_error) {
            return false;
        }
        let ctx = self.ctx.clone();
        let full = Instant::now() >= self.next_full;
        let slot = ctx.slot().await;
        // Answers over HTTP are not counted: the grace runs from the start.
        let (_uncounted, answers) = watch::channel(0);
        let read = ctx
            .talking(slot, answers, self.suspect, async {
                if full {
                    http::collect_http(&self.endpoint, port, &self.ctx.collect)
                        .await
                        .map(|c| (c.snapshot.clone(), Some(c.collection)))
                } else {
                    http::status_http(&self.endpoint, port, &self.ctx.collect)
                        .await
                        .map(|s| (s.snapshot, None))
                }
            })
            .await;
        match read {
            Ok((snapshot, collection)) => {
                self.identified(snapshot.device_id.to_string());
                self.contact_ok().await;
                self.failures = 0;
                let now = Instant::now();
                self.next_status = now + self.ctx.schedule.status_interval;
                self.record_status(snapshot.status.clone());
                match collection {
                    Some(c) => {
                        self.next_full = now + self.ctx.schedule.full_collection_interval;
                        self.ctx.publish(Message::Collection(Box::new(c))).await;
                    }
                    None => self.ctx.publish(Message::Snapshot(snapshot)).await,
                }
                for job in std::mem::take(&mut self.jobs) {
                    let why = "this projector answers only over HTTP (its ESC/VP.net port is closed or protected); orders need ESC/VP.net";
                    match job.work {
                        Work::Order(order) | Work::Apply(order, _) => {
                            let r = orders::failed(
                                &order,
                                epmc_proto::order::FailureReason::DeviceRefused,
                                why,
                                None,
                            );
                            self.ctx.complete(&order, r).await;
                        }
                        Work::ReadProfile(Some(tx)) => {
                            let _ = tx.send(Err(why.to_owned()));
                        }
                        Work::ReadProfile(None) => {}
                    }
                }
                true
            }
            Err(e) if e.is_no_server() => false,
            Err(e) => {
                self.failed(CollectError::Http(e)).await;
                true
            }
        }
    }

    /// Opens a session whose answers are counted on `answers`.
    async fn connect(&mut self, answers: watch::Sender<u32>) -> Result<Projector, CollectError> {
        let options = &self.ctx.collect;
        let mut p = tokio::time::timeout(
            options.connect_timeout + options.handshake_timeout + Duration::from_secs(1),
            Projector::connect(&self.endpoint, options),
        )
        .await
        .unwrap_or(Err(CollectError::TimedOut(Stage::Connect)))?;
        p.count_answers(answers);
        Ok(p)
    }

    /// Identifies the device, runs the queued orders, then whatever read is due. Returns
    /// `false` when the session failed (the failure is recorded).
    async fn work(&mut self, p: &mut Projector, notes: Option<&mut Option<Notifications>>) -> bool {
        let deadline = self.ctx.collect.deadline;
        let mut report = crate::collect::Report::default();
        match tokio::time::timeout(deadline, p.identify(&mut report)).await {
            Ok(Ok(id)) => self.identified(id.to_string()),
            Ok(Err(e)) => {
                self.failed(e).await;
                return false;
            }
            Err(_) => {
                self.failed(CollectError::TimedOut(Stage::Deadline)).await;
                return false;
            }
        }
        if let Some(n) = notes {
            *n = Some(p.notifications());
        }
        self.contact_ok().await;
        while let Some(mut job) = self.jobs.pop_front() {
            let done = match &mut job.work {
                Work::Order(order) => self.run_order(p, order.clone()).await,
                Work::ReadProfile(reply) => match orders::read_profile(p).await {
                    Ok(profile) => {
                        if let Some(tx) = reply.take() {
                            let _ = tx.send(Ok(profile));
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Work::Apply(order, profile) => {
                    let order = order.clone();
                    let profile = std::mem::take(profile);
                    let r = orders::apply_profile(p, &order, &profile).await;
                    tracing::debug!(order = %order.order_id, outcome = ?r.outcome, "settings applied");
                    self.ctx.complete(&order, r).await;
                    Ok(())
                }
            };
            if let Err(e) = done {
                // The session failed mid-job: keep it for the next attempt.
                self.jobs.push_front(job);
                self.failed(e).await;
                return false;
            }
        }
        let now = Instant::now();
        let read = if now >= self.next_full {
            tokio::time::timeout(deadline, self.full(p)).await
        } else if now >= self.next_status {
            tokio::time::timeout(deadline, self.status(p)).await
        } else {
            return true;
        };
        match read.unwrap_or(Err(CollectError::TimedOut(Stage::Deadline))) {
            Ok(()) => {
                self.failures = 0;
                true
            }
            Err(e) => {
                self.failed(e).await;
                false
            }
        }
    }

    async fn full(&mut self, p: &mut Projector) -> Result<(), CollectError> {
        let c = p.read_full(&self.endpoint.meta).await?;
        let now = Instant::now();
        self.next_full = now + self.ctx.schedule.full_collection_interval;
        self.next_status = now + self.ctx.schedule.status_interval;
        self.record_status(c.snapshot.status.clone());
        self.ctx
            .publish(Message::Collection(Box::new(c.collection)))
            .await;
        Ok(())
    }

    async fn status(&mut self, p: &mut Projector) -> Result<(), CollectError> {
        let s = p.read_status().await?;
        self.next_status = Instant::now() + self.ctx.schedule.status_interval;
        self.record_status(s.snapshot.status.clone());
        self.ctx.publish(Message::Snapshot(s.snapshot)).await;
        Ok(())
    }

    fn record_status(&self, status: epmc_proto::model::DeviceStatus) {
        self.ctx.status.update(self.endpoint.addr, |e| {
            e.status = Some(status);
            e.last_contact = Some(Timestamp::now().unix());
            e.reads += 1;
        });
    }

    /// Runs one order. `Err` only when the session itself failed before the order ran to an
    /// answer (the order is then retried); a refusal or a failed action is a result.
    async fn run_order(&mut self, p: &mut Projector, order: Order) -> Result<(), CollectError> {
        tracing::debug!(order = %order.order_id, device = %self.endpoint.addr, action = ?order.action, "running order");
        if let Some(r) = orders::precheck(&order, Timestamp::now()) {
            self.ctx.complete(&order, r).await;
            return Ok(());
        }
        let r = match order.action {
            OrderAction::CollectNow => match p.read_full(&self.endpoint.meta).await {
                Ok(c) => {
                    self.record_status(c.snapshot.status.clone());
                    self.ctx
                        .publish(Message::Collection(Box::new(c.collection)))
                        .await;
                    orders::result(&order, OrderOutcome::Done, None)
                }
                Err(e) if session_lost(&e) => return Err(e),
                Err(e) => orders::unreachable(&order, &e),
            },
            _ => {
                let r = orders::execute(p, &order).await;
                // A changed projector: report its new status at once.
                if matches!(r.outcome, OrderOutcome::Done)
                    && let Ok(s) = p.read_status().await
                {
                    self.record_status(s.snapshot.status.clone());
                    self.ctx.publish(Message::Snapshot(s.snapshot)).await;
                }
                r
            }
        };
        tracing::debug!(order = %order.order_id, outcome = ?r.outcome, "order finished");
        self.ctx.complete(&order, r).await;
        Ok(())
    }

    fn identified(&mut self, id: String) {
        if self.device_id.as_deref() != Some(id.as_str()) {
            self.ctx.registry.register(&id, self.endpoint.addr);
            self.ctx.status.update(self.endpoint.addr, |e| {
                e.device_id = Some(id.clone());
            });
            self.device_id = Some(id);
        }
    }

    fn current_id(&self) -> String {
        self.device_id
            .clone()
            .unwrap_or_else(|| crate::collect::device_id(None, self.endpoint.addr).to_string())
    }

    async fn contact_ok(&mut self) {
        self.ctx.status.update(self.endpoint.addr, |e| {
            e.reach = Reach::Ok;
            e.failures = 0;
            e.last_contact = Some(Timestamp::now().unix());
        });
        if self.reachable == Some(false) {
            self.publish_event(DeviceEvent {
                device_id: orders::text(&self.current_id()),
                at: Timestamp::now(),
                event: DeviceEventKind::Reachable,
            })
            .await;
        }
        self.reachable = Some(true);
        self.suspect = false;
    }

    async fn failed(&mut self, e: CollectError) {
        self.failures = self.failures.saturating_add(1);
        let busy = matches!(e, CollectError::Busy);
        self.suspect = matches!(e, CollectError::TimedOut(_));
        let failures = self.failures;
        self.ctx.status.update(self.endpoint.addr, |s| {
            s.reach = if busy {
                Reach::Busy
            } else {
                Reach::Failed(e.to_string())
            };
            s.failures = failures;
            s.failed_attempts += 1;
        });
        let interval = self.ctx.schedule.status_interval;
        let pause = interval.saturating_mul(1 << (self.failures - 1).min(3));
        self.next_status = Instant::now() + pause;
        // Orders: a few quick retries, then a failure result each.
        let mut keep = VecDeque::new();
        for mut job in std::mem::take(&mut self.jobs) {
            job.attempts += 1;
            if job.attempts < ORDER_ATTEMPTS {
                keep.push_back(job);
                continue;
            }
            match job.work {
                Work::Order(order) | Work::Apply(order, _) => {
                    self.ctx
                        .complete(&order, orders::unreachable(&order, &e))
                        .await;
                }
                Work::ReadProfile(Some(tx)) => {
                    let _ = tx.send(Err(format!("it could not be reached: {e}")));
                }
                Work::ReadProfile(None) => {}
            }
        }
        if !keep.is_empty() {
            self.next_status = self.next_status.min(Instant::now() + self.ctx.order_retry);
        }
        // A full collection still due waits for the next attempt too (else it would be
        // retried at once, in a loop).
        self.next_full = self.next_full.max(self.next_status);
        self.jobs = keep;
        if !busy && self.reachable != Some(false) {
            self.ctx.exceptions.record(
                Severity::Warning,
                "collector",
                &format!("{} ({}): {e}", self.current_id(), self.endpoint.addr),
            );
            if self.reachable == Some(true) || self.device_id.is_none() {
                self.publish_event(DeviceEvent {
                    device_id: orders::text(&self.current_id()),
                    at: Timestamp::now(),
                    event: DeviceEventKind::Unreachable {
                        reason: orders::text(&e.to_string()),
                    },
                })
                .await;
            }
            self.reachable = Some(false);
        }
    }

    async fn publish_event(&self, ev: DeviceEvent) {
        self.ctx.publish(Message::Event(ev)).await;
    }

    fn mark_first_done(&mut self) {
        if !self.first_done {
            self.first_done = true;
            self.ctx.registry.first_attempt_done();
        }
    }
}

/// Whether a collection error means the session is gone (rather than one answer failing).
fn session_lost(e: &CollectError) -> bool {
    matches!(
        e,
        CollectError::Dropped | CollectError::TimedOut(_) | CollectError::Garbage(_)
    )
}

/// Completes once the service is stopping (the guard `wait_for` returns is not kept).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
